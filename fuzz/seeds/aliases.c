/* Replaces two names of one process function, and an indirect function: both refused. */
int alias_a(int x) { return x + 1; }
int alias_b(int x) { return x + 2; }
int dispatch(int x) { return x; }
