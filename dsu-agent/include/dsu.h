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

/* Installs the agent with the default configuration: trigger signal SIGUSR2, control
 * directory $DSU_CONTROL_DIR, else $XDG_RUNTIME_DIR/dsu/<pid>, else /tmp/dsu-<uid>/<pid>.
 * Returns 0, or a negative errno-style code (-EACCES, -EPERM: control directory refused;
 * -EBUSY: the stop signal is in use). Idempotent. */
int dsu_install(void);

#ifdef __cplusplus
}
#endif

#endif /* DSU_H */
