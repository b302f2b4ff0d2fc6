/* Thread-local access to the process's variable: general dynamic (TLSGD and __tls_get_addr)
 * by default, initial exec (GOTTPOFF) with -ftls-model=initial-exec. */
extern __thread int tls_counter;

int tick_tls(void) { return ++tls_counter; }
