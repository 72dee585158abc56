#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static int act[64] __attribute__((aligned(64)));
/* lookups: acc zmm0-11, idx zmm12-23 (kept), tmp zmm24-27, table zmm31 */
#define L(a,x,t) "vpermw %%zmm31, %%zmm" #x ", %%zmm" #t "\n\t vpaddw %%zmm" #t ", %%zmm" #a ", %%zmm" #a "\n\t"
/* vnni: acc, weight zmm28/29, embedded broadcast from act */
#define D(a,w,o) "vpdpbusd " #o "(%1)%{1to16%}, %%zmm" #w ", %%zmm" #a "\n\t"
#define DR(a,w) "vpdpbusd %%zmm30, %%zmm" #w ", %%zmm" #a "\n\t"
#define BC(o) "vpbroadcastd " #o "(%1), %%zmm30\n\t"
#define RUN(NAME, BODY, MACS) static double NAME(long n){ double t=now(); long c=n; \
  __asm__ volatile("1:\n\t" BODY "dec %0\n\t jnz 1b" : "+r"(c) : "r"(act) : "memory"); t=now()-t; return n*(double)(MACS)/t; }
RUN(lut12, L(0,12,24) L(1,13,25) L(2,14,26) L(3,15,27) L(4,16,24) L(5,17,25) L(6,18,26) L(7,19,27) L(8,20,24) L(9,21,25) L(10,22,26) L(11,23,27), 12*96)
RUN(vnni12, D(0,28,0) D(1,29,4) D(2,28,8) D(3,29,12) D(4,28,16) D(5,29,20) D(6,28,24) D(7,29,28) D(8,28,32) D(9,29,36) D(10,28,40) D(11,29,44), 12*64)
RUN(vnnireg12, DR(0,28) DR(1,29) DR(2,28) DR(3,29) DR(4,28) DR(5,29) DR(6,28) DR(7,29) DR(8,28) DR(9,29) DR(10,28) DR(11,29), 12*64)
RUN(h6_6, L(0,12,24) D(6,28,0) L(1,13,25) D(7,29,4) L(2,14,26) D(8,28,8) L(3,15,27) D(9,29,12) L(4,16,24) D(10,28,16) L(5,17,25) D(11,29,20), 6*96+6*64)
RUN(h8_4, L(0,12,24) L(1,13,25) D(8,28,0) L(2,14,26) L(3,15,27) D(9,29,4) L(4,16,24) L(5,17,25) D(10,28,8) L(6,18,26) L(7,19,27) D(11,29,12), 8*96+4*64)
RUN(h6_6r, L(0,12,24) DR(6,28) L(1,13,25) DR(7,29) L(2,14,26) DR(8,28) L(3,15,27) DR(9,29) L(4,16,24) DR(10,28) L(5,17,25) DR(11,29), 6*96+6*64)
/* broadcast once per 2 vpdpbusd (2 channel vectors per pixel) */
RUN(h6_6b, L(0,12,24) BC(0) DR(6,28) L(1,13,25) DR(7,29) L(2,14,26) BC(4) DR(8,28) L(3,15,27) DR(9,29) L(4,16,24) BC(8) DR(10,28) L(5,17,25) DR(11,29), 6*96+6*64)
int main(){ for(int k=0;k<4;k++) printf("lut %.0f vnni(bcst mem) %.0f vnni(reg) %.0f | 6l+6d(mem bcst) %.0f 8l+4d %.0f 6l+6d(reg) %.0f 6l+6d(bcast/2) %.0f GMAC/s\n",
  lut12(3000000)/1e9, vnni12(3000000)/1e9, vnnireg12(3000000)/1e9, h6_6(3000000)/1e9, h8_4(3000000)/1e9, h6_6r(3000000)/1e9, h6_6b(3000000)/1e9); }
