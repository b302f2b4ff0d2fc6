/* Calls an indirect function (IFUNC) of libc and a weak hook the process lacks (bound to 0). */
extern char *strchr(const char *, int);
extern void optional_hook(void) __attribute__((weak));

int alias_b(const char *s)
{
	if (optional_hook)
		optional_hook();
	return strchr(s, 'x') != 0;
}
