/* Calls a function the synthetic process defines `static` in two modules: ambiguous. */
extern int helper_static(int);

int alias_a(int x) { return helper_static(x) + 1; }
