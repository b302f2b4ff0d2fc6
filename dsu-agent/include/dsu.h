/* dsu: live-patch functions of this running process.
 *
 * Link libdsu_agent.a (or libdsu_agent.so) and call dsu_install() early in main(). Then
 * `dsu apply -p PID fix.o` replaces functions of the running program. An unmodified program
 * can instead be started with LD_PRELOAD=libdsu_agent.so.
 */
#ifndef DSU_H
#define DSU_H

#include <stddef.h>

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

/* Installs the agent as dsu_install() does, trusting only patches signed (dsu sign) by a key
 * listed in the file keys_file (one public key per line, as dsu keygen writes KEY.pub), and,
 * when require_binding is not 0, only patches bound to this program's build (dsu pack).
 * keys_file NULL: $DSU_TRUSTED_KEYS, else /etc/dsu/trusted-keys when it exists, else any
 * patch. Returns as dsu_install(); -EINVAL for a bad key file (its path and line are printed
 * on stderr) or a path that is not UTF-8. See docs/security.md. */
int dsu_install_trusting(const char *keys_file, int require_binding);

/* Stacks no thread runs on. A program that switches stacks (makecontext/swapcontext,
 * boost.context, its own coroutines) declares each stack it creates, so that an update never
 * replaces a function a suspended coroutine will return into: every update scans the declared
 * stacks and waits (then refuses) while one holds a return address into a function being
 * replaced. A program that switches stacks and has never declared one is refused updates.
 * Both functions are cheap and thread-safe; do not call them from a signal handler.
 *
 * dsu_stack_declare: declares [lo, lo + len). Returns 0, or -EINVAL (lo is NULL or len is 0),
 * -EOVERFLOW (the range wraps around), -EEXIST (it overlaps a declared stack), -ENOSPC (16384
 * stacks are declared already).
 * dsu_stack_forget: forgets the declared stack that starts at lo; call it before the stack is
 * freed. Returns 0, or -ENOENT (no declared stack starts at lo). */
int dsu_stack_declare(void *lo, size_t len);
int dsu_stack_forget(void *lo);

#ifdef __cplusplus
}
#endif

#endif /* DSU_H */
