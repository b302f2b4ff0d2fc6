/* A patch naming the statics of one source file of the program (.dsu.scope). */
int helper(int x);
extern int count_0 __asm__("count.0");
int compute(int x) { return helper(x) * 10 + count_0; }
__asm__(".section .dsu.scope,\"\",@progbits\n.asciz \"helper\"\n.asciz \"shapes.c\"\n"
        ".asciz \"count.0\"\n.asciz \"shapes.c\"\n.previous\n");
