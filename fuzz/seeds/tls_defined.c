/* A patch that defines a thread-local variable: refused at load (.tbss). */
static __thread int own_tls;

int tick_tls(void) { return ++own_tls; }
