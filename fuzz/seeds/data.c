/* A patch with its own data: initialised, zeroed, common (-fcommon), read-only pointers. */
int new_counter;
static int zeroed[100];
int data_init = 5;
static const char *const names[] = {"alpha", "beta", "gamma"};

int counter_next(void)
{
	zeroed[new_counter % 100]++;
	return ++new_counter + data_init;
}

const char *name_of(unsigned i) { return names[i % 3]; }
