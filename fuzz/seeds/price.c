/* A patch of the synthetic process's functions: calls into the process and libc (PLT32),
 * exported data through the GOT (REX_GOTPCRELX), strings, a local helper, a jump table. */
#include <stdio.h>
#include <string.h>

extern int counter;
extern const char *config_name;
int compute(int a, int b);

static int helper(int x) { return x * 3 + 1; }

int price(int qty)
{
	counter++;
	return compute(qty, helper(qty)) + (int)strlen(config_name);
}

const char *greet(const char *who)
{
	static char buf[64];
	snprintf(buf, sizeof buf, "hello, %s", who);
	puts(buf);
	return buf;
}

static const int table[] = {1, 2, 3, 5, 8, 13, 21};

int tick(unsigned i) { return table[i % 7]; }

int handle_request(int kind, int x)
{
	switch (kind) {
	case 0: return x + 1;
	case 1: return x * 7;
	case 2: return compute(x, 2);
	case 3: return x - 9;
	case 4: return price(x);
	case 5: return x << 3;
	case 6: return tick((unsigned)x);
	default: return -1;
	}
}

/* New in the patch: replaces nothing. */
int added_function(int x) { return helper(x) * 2; }
