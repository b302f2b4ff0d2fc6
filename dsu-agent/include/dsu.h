/* dsu: live-patch functions of this running process.
 *
 * Link libdsu_agent.a (or libdsu_agent.so) and call dsu_install() early in main(). Then
 * `dsu apply -p PID fix.o` replaces functions of the running program. An unmodified program
 * can instead be started with LD_PRELOAD=libdsu_agent.so.
 */
#ifndef DSU_H
#define DSU_H

#ifdef __cplusplus
extern "C" {
#endif

/* Installs the agent with the default configuration: trigger signal $DSU_SIGNAL, else SIGUSR2
 * (DSU_SIGNAL=none: no trigger signal); stop signal $DSU_STOP_SIGNAL, else SIGRTMIN+5; control
 * directory $DSU_CONTROL_DIR, else $XDG_RUNTIME_DIR/dsu/<pid>, else /tmp/dsu-<uid>/<pid>,
 * with the control socket agent.sock in it. Returns 0, or a negative errno-style code
 * (-EACCES, -EPERM: control directory refused; -EBUSY: the stop signal is in use; -EINVAL: a
 * bad DSU_SIGNAL or DSU_STOP_SIGNAL; -ECHILD: called in a fork()ed child of a process with an
 * agent). Idempotent. */
int dsu_install(void);

#ifdef __cplusplus
}
#endif

#endif /* DSU_H */
