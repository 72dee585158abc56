/* Instruction-throughput peaks of the kernels' inner recipes: see peaks.py (ternbench). */
#include <immintrin.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#define A512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vpopcntdq,avx512dq,fma")))
#define A2 __attribute__((target("avx2,fma")))
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec + 1e-9 * t.tv_nsec; }
static volatile long sink;

A2 static double fma256(long n) {  /* 8 lanes per FMA */
  __m256 acc[10]; __m256 a = _mm256_set1_ps(1.0f), b = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < 10; i++) acc[i] = _mm256_setzero_ps();
  double t = now();
  for (long r = 0; r < n; r++) {
    _Pragma("GCC unroll 16") for (int i = 0; i < 10; i++) acc[i] = _mm256_fmadd_ps(a, b, acc[i]);
    __asm__ volatile("" : "+x"(a), "+x"(b));
  }
  t = now() - t; float s = 0; float o[8];
  for (int i = 0; i < 10; i++) { _mm256_storeu_ps(o, acc[i]); s += o[0]; }
  sink = (long)s; return n * 10.0 * 8 / t;
}
A512 static double fma512(long n) {  /* 16 lanes per FMA */
  __m512 acc[10]; __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 10; i++) acc[i] = _mm512_setzero_ps();
  double t = now();
  for (long r = 0; r < n; r++) {
    _Pragma("GCC unroll 16") for (int i = 0; i < 10; i++) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
    __asm__ volatile("" : "+v"(a), "+v"(b));
  }
  t = now() - t; float s = 0;
  for (int i = 0; i < 10; i++) s += _mm512_reduce_add_ps(acc[i]);
  sink = (long)s; return n * 10.0 * 16 / t;
}
A512 static double vnni(long n) {  /* 64 MACs per vpdpbusd */
  __m512i acc[12]; __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
  for (int i = 0; i < 12; i++) acc[i] = _mm512_setzero_si512();
  double t = now();
  for (long r = 0; r < n; r++) {
    _Pragma("GCC unroll 16") for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(a), "+v"(b));
  }
  t = now() - t; long s = 0;
  for (int i = 0; i < 12; i++) s += _mm512_reduce_add_epi32(acc[i]);
  sink = s; return n * 12.0 * 64 / t;
}
A2 static double maddubs(long n) {  /* 32 MACs per vpmaddubsw + vpmaddwd + vpaddd */
  __m256i acc[8], b[8]; __m256i a = _mm256_set1_epi8(1), one = _mm256_set1_epi16(1);
  for (int i = 0; i < 8; i++) { acc[i] = _mm256_setzero_si256(); b[i] = _mm256_set1_epi8(i); }
  double t = now();
  for (long r = 0; r < n; r++) {  /* a distinct weight vector per step: nothing to share */
    _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++)
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b[i]), one));
    __asm__ volatile("" : "+x"(a));
  }
  t = now() - t; int o[8]; long s = 0;
  for (int i = 0; i < 8; i++) { _mm256_storeu_si256((__m256i *)o, acc[i]); s += o[0]; }
  sink = s; return n * 8.0 * 32 / t;
}
/* 128 MACs per 4 vpmaddubsw + 3 vpaddw + vpmaddwd + vpaddd (tvm_t2_avx2's int16 chain) */
A2 static double maddubs_chain(long n) {
  __m256i acc[8], b[8], a[4], one = _mm256_set1_epi16(1);
  for (int i = 0; i < 8; i++) { acc[i] = _mm256_setzero_si256(); b[i] = _mm256_set1_epi8(i); }
  for (int j = 0; j < 4; j++) a[j] = _mm256_set1_epi8(1 + j);
  double t = now();
  for (long r = 0; r < n; r++) {  /* four activation vectors: every (a, b) product distinct */
    _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) {
      __m256i s = _mm256_add_epi16(
          _mm256_add_epi16(_mm256_maddubs_epi16(a[0], b[i]), _mm256_maddubs_epi16(a[1], b[i])),
          _mm256_add_epi16(_mm256_maddubs_epi16(a[2], b[i]), _mm256_maddubs_epi16(a[3], b[i])));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(s, one));
    }
    __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]));
  }
  t = now() - t; int o[8]; long s = 0;
  for (int i = 0; i < 8; i++) { _mm256_storeu_si256((__m256i *)o, acc[i]); s += o[0]; }
  sink = s; return n * 8.0 * 128 / t;
}
A512 static double fgq4(long n) {  /* 64 MACs per vpdpbusd + vcvtdq2ps + FMA */
  __m512 acc[8]; __m512i w[8]; __m512 sc[8];
  __m512i cw = _mm512_set1_epi32(-3), a = _mm512_set1_epi8(7);
  for (int i = 0; i < 8; i++) { acc[i] = _mm512_setzero_ps(); w[i] = _mm512_set1_epi8(i - 3);
                                sc[i] = _mm512_set1_ps(1e-3f * i); }
  double t = now();
  for (long r = 0; r < n; r++) {
    _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++)
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(cw, a, w[i])), sc[i], acc[i]);
    __asm__ volatile("" : "+v"(a), "+v"(cw));
  }
  t = now() - t; float s = 0;
  for (int i = 0; i < 8; i++) s += _mm512_reduce_add_ps(acc[i]);
  sink = (long)s; return n * 8.0 * 64 / t;
}
A512 static double popc(long n) {  /* 512 MACs per word step: and, ternlog, 2 popcnt, 2 add */
  __m512i nz[8], ng[8], wm[8], ws[8];
  __m512i am = _mm512_set1_epi64(0x123456789abcdefLL), as = _mm512_set1_epi64(0x0fedcba987654321LL);
  for (int i = 0; i < 8; i++) { nz[i] = ng[i] = _mm512_setzero_si512();
    wm[i] = _mm512_set1_epi64(0x5555aaaa1234LL * (i + 1)); ws[i] = _mm512_set1_epi64(0x0f0f33331111LL * (i + 3)); }
  double t = now();
  for (long r = 0; r < n; r++) {
    _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) {
      __m512i m = _mm512_and_si512(am, wm[i]);
      __m512i g = _mm512_ternarylogic_epi64(m, as, ws[i], 0x28);
      nz[i] = _mm512_add_epi64(nz[i], _mm512_popcnt_epi64(m));
      ng[i] = _mm512_add_epi64(ng[i], _mm512_popcnt_epi64(g));
    }
    __asm__ volatile("" : "+v"(am), "+v"(as));
  }
  t = now() - t; long s = 0;
  for (int i = 0; i < 8; i++) s += _mm512_reduce_add_epi64(nz[i]) - 2 * _mm512_reduce_add_epi64(ng[i]);
  sink = s; return n * 8.0 * 512 / t;
}
A512 static double lut(long n) {  /* 256 MACs per step: 2 planes x (2 vpshufb, 2 unpack, 2 add) */
  __m512i acc[8], ip[2], in[2];
  __m512i tlo = _mm512_set1_epi32(0x03020100), thi = _mm512_set1_epi32(0x01000100);
  for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_si512();
  for (int i = 0; i < 2; i++) { ip[i] = _mm512_set1_epi8(5 + i); in[i] = _mm512_set1_epi8(10 - i); }
  double t = now();
  for (long r = 0; r < n; r++) {  /* distinct weight indices per step: nothing to share */
    _Pragma("GCC unroll 16") for (int i = 0; i < 2; i++) {
      __m512i pl = _mm512_shuffle_epi8(tlo, ip[i]), ph = _mm512_shuffle_epi8(thi, ip[i]);
      __m512i nl = _mm512_shuffle_epi8(tlo, in[i]), nh = _mm512_shuffle_epi8(thi, in[i]);
      acc[4 * i] = _mm512_add_epi16(acc[4 * i], _mm512_unpacklo_epi8(pl, ph));
      acc[4 * i + 1] = _mm512_add_epi16(acc[4 * i + 1], _mm512_unpackhi_epi8(pl, ph));
      acc[4 * i + 2] = _mm512_sub_epi16(acc[4 * i + 2], _mm512_unpacklo_epi8(nl, nh));
      acc[4 * i + 3] = _mm512_sub_epi16(acc[4 * i + 3], _mm512_unpackhi_epi8(nl, nh));
    }
    __asm__ volatile("" : "+v"(tlo), "+v"(thi));
  }
  t = now() - t; long s = 0;
  for (int i = 0; i < 8; i++) s += _mm512_reduce_add_epi32(acc[i]);
  sink = s; return n * 2.0 * 256 / t;
}
A512 static double permw(long n) {  /* 96 MACs per vpermw (27-entry table of 3 ternary weights) + vpaddw */
  __m512i acc[8], ix[8]; __m512i tab = _mm512_set1_epi16(3);
  for (int i = 0; i < 8; i++) { acc[i] = _mm512_setzero_si512(); ix[i] = _mm512_set1_epi16(i); }
  double t = now();
  for (long r = 0; r < n; r++) {  /* distinct indices per lookup: nothing to share */
    _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++)
      acc[i] = _mm512_add_epi16(acc[i], _mm512_permutexvar_epi16(ix[i], tab));
    __asm__ volatile("" : "+v"(tab));
  }
  t = now() - t; long s = 0;
  for (int i = 0; i < 8; i++) s += _mm512_reduce_add_epi32(acc[i]);
  sink = s; return n * 8.0 * 96 / t;
}
#define VBMI __attribute__((target("avx512f,avx512bw,avx512vbmi")))
VBMI static double permi2b(long n) {  /* 256 MACs per vpermi2b (81-entry int8 table of 4 ternary
                                       activations' sums, indexed by 4 ternary weights) + vpaddb */
  __m512i acc[8], ix[8]; __m512i lo = _mm512_set1_epi8(3), hi = _mm512_set1_epi8(-2);
  for (int i = 0; i < 8; i++) { acc[i] = _mm512_setzero_si512(); ix[i] = _mm512_set1_epi8(9 * i); }
  double t = now();
  for (long r = 0; r < n; r++) {  /* distinct indices per lookup: nothing to share */
    _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++)
      acc[i] = _mm512_add_epi8(acc[i], _mm512_permutex2var_epi8(lo, ix[i], hi));
    __asm__ volatile("" : "+v"(lo), "+v"(hi));
  }
  t = now() - t; long s = 0;
  for (int i = 0; i < 8; i++) s += _mm512_reduce_add_epi32(acc[i]);
  sink = s; return n * 8.0 * 256 / t;
}
#define AMX __attribute__((target("amx-tile,amx-int8")))
/* Linux hands out the AMX tile state on request only (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) */
#include <sys/syscall.h>
#include <unistd.h>
struct tilecfg { unsigned char palette, start; unsigned char pad[14]; unsigned short colsb[16];
                 unsigned char rows[16]; };
AMX static double amx(long n) {  /* 16384 MACs per tdpbssd: 16 x 16 int32 += 16 x 64 s8 . 64 x 16 s8 */
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 0;
  struct tilecfg c; memset(&c, 0, sizeof c); c.palette = 1;
  for (int i = 0; i < 8; i++) { c.rows[i] = 16; c.colsb[i] = 64; }
  _tile_loadconfig(&c);
  static signed char buf[16 * 64] __attribute__((aligned(64)));
  for (int i = 0; i < 16 * 64; i++) buf[i] = (signed char)(i % 3 - 1);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, buf, 64); _tile_loadd(5, buf, 64); _tile_loadd(6, buf, 64); _tile_loadd(7, buf, 64);
  double t = now();
  for (long r = 0; r < n / 64; r++) {  /* 4 independent accumulator tiles hide the latency */
    _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {
      _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7); _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7);
    }
  }
  t = now() - t;
  static int o[16 * 16] __attribute__((aligned(64)));
  _tile_stored(0, o, 64); sink = o[0];
  _tile_release();
  return (n / 64) * 16.0 * 16384 / t;
}
#define AMXBF __attribute__((target("amx-tile,amx-bf16")))
AMXBF static double amxbf(long n) {  /* 8192 MACs per tdpbf16ps: 16 x 16 fp32 += 16 x 32 . 32 x 16 bf16 */
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 0;
  struct tilecfg c; memset(&c, 0, sizeof c); c.palette = 1;
  for (int i = 0; i < 8; i++) { c.rows[i] = 16; c.colsb[i] = 64; }
  _tile_loadconfig(&c);
  static unsigned short buf[16 * 32] __attribute__((aligned(64)));
  for (int i = 0; i < 16 * 32; i++) buf[i] = (unsigned short)(i % 3 ? 0x3f80 : 0xbf80);  /* +-1 */
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, buf, 64); _tile_loadd(5, buf, 64); _tile_loadd(6, buf, 64); _tile_loadd(7, buf, 64);
  double t = now();
  for (long r = 0; r < n / 64; r++) {
    _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  t = now() - t;
  static float o[16 * 16] __attribute__((aligned(64)));
  _tile_stored(0, o, 64); sink = (long)o[0];
  _tile_release();
  return (n / 64) * 16.0 * 8192 / t;
}
typedef double (*fn)(long);
int main(int argc, char **argv) {
  struct { const char *name; fn f; } r[] = {
    {"fp32_fma256", fma256}, {"fp32_fma512", fma512}, {"int8_vpdpbusd", vnni},
    {"int8_vpmaddubsw", maddubs}, {"int8_vpmaddubsw_chain", maddubs_chain}, {"fgq4", fgq4},
    {"tt_popcount", popc}, {"lut_exact", lut},
    {"lut_vpermw", permw}, {"tt_vpermi2b", permi2b}, {"int8_amx", amx},
    {"bf16_amx", amxbf}};
  for (int a = 1; a < argc; a++)
    for (unsigned i = 0; i < sizeof r / sizeof r[0]; i++)
      if (!strcmp(argv[a], r[i].name)) {
        double best = 0;
        r[i].f(2000000);  /* warm-up (clock ramp) */
        for (int k = 0; k < 5; k++) { double v = r[i].f(4000000); if (v > best) best = v; }
        if (best > 0) printf("%s %.3f\n", r[i].name, best / 1e9);  /* 0: refused (AMX) */
      }
  return 0;
}
