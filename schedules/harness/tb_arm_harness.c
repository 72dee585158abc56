/* ternbench: run one TVM-exported kernel library WITHOUT the TVM runtime (qemu-user, boards).
 *
 * A kernel library exported by TVM's LLVM backend needs only a few things from the runtime:
 * the function-pointer slots __TVMBackendParallelLaunch / __TVMBackendAllocWorkspace /
 * __TVMBackendFreeWorkspace (filled here after dlopen) and the symbol
 * TVMFFIErrorSetRaisedFromCStrParts (defined here; the harness is linked with -rdynamic so the
 * library resolves it against the executable). The packed entry point __tvm_ffi_main follows
 * the TVM-FFI "safe call" convention: int f(void* self, const TVMFFIAny* args, int32_t n,
 * TVMFFIAny* result).
 *
 * Usage: tb_arm_harness KERNEL.so MANIFEST
 *
 * MANIFEST, one directive per line:
 *   tasks <n>                               parallel tasks per launch (run one after another)
 *   in  <dl_code> <bits> <ndim> <d0> ... <file>   an input tensor, raw little-endian bytes
 *   out <dl_code> <bits> <ndim> <d0> ... <file>   the output tensor, written after the call
 * Tensors are passed to the kernel in manifest order (inputs and output interleaved as listed).
 * The output buffer starts filled with 0xFF bytes (NaN for float32), so an element the kernel
 * never writes cannot pass a comparison by accident.
 *
 * A manifest whose first directive is "plan" runs a WHOLE MODEL instead: a straight-line
 * program of calls into the library's functions (the layers' kernels and the stages between
 * them, as the Relax main of schedules/graph.py calls them), over tensors named by number:
 *   plan
 *   tasks <n>
 *   tensor <id> <dl_code> <bits> <ndim> <d0> ...    allocate (filled with 0xFF bytes)
 *   view <id> <src> <ndim> <d0> ...                 the same memory as <src>, another shape
 *   load <id> <file>                                fill once (parameters)
 *   input <id> <file> <count>                       the program runs <count> times, each run
 *                                                   reading the next slice of <file> into <id>
 *   output <id> <file>                              appended to <file> after every run
 *   call <symbol> <id> <id> ...                     __tvm_ffi_<symbol>(tensors...), in order
 *
 * Exit status: 0 ok, 1 setup error (message on stderr), 2 usage, 3 the kernel returned an error.
 */
#include <dlfcn.h>
#include <dlpack/dlpack.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

#define MAX_ARGS 32
#define MAX_DIMS 8

typedef struct {
  void* sync_handle;
  int32_t num_task;
} TBParallelGroupEnv;
typedef int (*TBParallelLambda)(int task_id, TBParallelGroupEnv* penv, void* cdata);

static int g_tasks = 1;

/* The tasks of a parallel region run one after another: a kernel's parallel loop splits its
 * iterations by (task_id, num_task), so running every task in turn covers the whole loop and
 * still exercises the split (the schedules use no barriers inside parallel regions). */
static int serial_parallel_launch(TBParallelLambda f, void* cdata, int num_task) {
  int n = num_task > 0 ? num_task : g_tasks;
  TBParallelGroupEnv env = {NULL, n};
  for (int i = 0; i < n; ++i) {
    int rc = f(i, &env, cdata);
    if (rc != 0) return rc;
  }
  return 0;
}

static void* alloc_workspace(int device_type, int device_id, uint64_t nbytes, int dtype_code,
                             int dtype_bits) {
  void* p = NULL;
  (void)device_type; (void)device_id; (void)dtype_code; (void)dtype_bits;
  return posix_memalign(&p, 64, nbytes ? nbytes : 64) ? NULL : p;
}

static int free_workspace(int device_type, int device_id, void* ptr) {
  (void)device_type; (void)device_id;
  free(ptr);
  return 0;
}

/* Kernels report errors (e.g. a shape check) through this TVM-FFI C API function. */
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  fprintf(stderr, "kernel raised %s:", kind);
  for (int32_t i = 0; i < n; ++i) fprintf(stderr, " %s", parts[i]);
  fprintf(stderr, "\n");
}

static int fail(const char* what, const char* detail) {
  fprintf(stderr, "tb_arm_harness: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  return 1;
}

/* ------------------------------------------------------------------ whole-model plans */

#define PLAN_TENSORS 1024
#define PLAN_CALLS 1024

typedef struct {
  TVMFFISafeCallType fn;
  int n;
  int ids[MAX_ARGS];
} PlanCall;

static DLTensor p_tensors[PLAN_TENSORS];
static int64_t p_shapes[PLAN_TENSORS][MAX_DIMS];
static size_t p_bytes[PLAN_TENSORS];
static int p_defined[PLAN_TENSORS];
static PlanCall p_calls[PLAN_CALLS];

static int parse_shape(const char* s, int* off, int ndim, int64_t* shape, size_t* count) {
  int used = 0;
  *count = 1;
  for (int d = 0; d < ndim; ++d) {
    long long v;
    if (sscanf(s + *off, "%lld%n", &v, &used) != 1 || v < 0) return 0;
    *off += used;
    shape[d] = (int64_t)v;
    *count *= (size_t)v;
  }
  return 1;
}

static int plan_id(const char* s, int* off, int must_exist) {
  int id, used = 0;
  if (sscanf(s + *off, "%d%n", &id, &used) != 1 || id < 0 || id >= PLAN_TENSORS) return -1;
  *off += used;
  if (must_exist && !p_defined[id]) return -1;
  return id;
}

static int read_exact(FILE* f, void* dst, size_t n) { return fread(dst, 1, n, f) == n; }

static int run_plan(void* lib, FILE* mf) {
  char line[16384], path[4096];
  int n_calls = 0, in_id = -1, out_id = -1;
  long in_count = 0;
  char in_path[4096] = "", out_path_p[4096] = "";
  while (fgets(line, sizeof line, mf)) {
    char kind[16];
    int off = 0, used = 0;
    if (sscanf(line, "%15s%n", kind, &off) != 1) continue;
    if (strcmp(kind, "tasks") == 0) {
      if (sscanf(line + off, "%d", &g_tasks) != 1 || g_tasks < 1) return fail("bad tasks line", line);
    } else if (strcmp(kind, "tensor") == 0 || strcmp(kind, "view") == 0) {
      int is_view = kind[0] == 'v';
      int id = plan_id(line, &off, 0), src = -1, code = 2, bits = 32, ndim;
      if (id < 0 || p_defined[id]) return fail("bad or repeated tensor id", line);
      if (is_view) {
        if ((src = plan_id(line, &off, 1)) < 0) return fail("view of an unknown tensor", line);
        code = p_tensors[src].dtype.code;
        bits = p_tensors[src].dtype.bits;
        if (sscanf(line + off, "%d%n", &ndim, &used) != 1) return fail("bad view line", line);
      } else if (sscanf(line + off, "%d %d %d%n", &code, &bits, &ndim, &used) != 3 || bits % 8) {
        return fail("bad tensor line", line);
      }
      off += used;
      if (ndim < 0 || ndim > MAX_DIMS) return fail("bad rank", line);
      size_t count;
      if (!parse_shape(line, &off, ndim, p_shapes[id], &count)) return fail("bad shape", line);
      size_t nbytes = count * (size_t)(bits / 8);
      void* data = NULL;
      if (is_view) {
        if (nbytes != p_bytes[src]) return fail("view changes the byte size", line);
        data = p_tensors[src].data;
      } else {
        if (posix_memalign(&data, 64, nbytes ? nbytes : 64)) return fail("out of memory", NULL);
        memset(data, 0xFF, nbytes);
      }
      DLTensor* t = &p_tensors[id];
      memset(t, 0, sizeof *t);
      t->data = data;
      t->device.device_type = kDLCPU;
      t->ndim = ndim;
      t->dtype.code = (uint8_t)code;
      t->dtype.bits = (uint8_t)bits;
      t->dtype.lanes = 1;
      t->shape = p_shapes[id];
      p_bytes[id] = nbytes;
      p_defined[id] = 1;
    } else if (strcmp(kind, "load") == 0) {
      int id = plan_id(line, &off, 1);
      if (id < 0 || sscanf(line + off, " %4095[^\n]", path) != 1) return fail("bad load line", line);
      FILE* f = fopen(path, "rb");
      if (!f) return fail("cannot open input", path);
      int ok = read_exact(f, p_tensors[id].data, p_bytes[id]);
      fclose(f);
      if (!ok) return fail("input file is shorter than its tensor", path);
    } else if (strcmp(kind, "input") == 0) {
      if ((in_id = plan_id(line, &off, 1)) < 0 ||
          sscanf(line + off, " %4095s %ld", in_path, &in_count) != 2 || in_count < 1)
        return fail("bad input line", line);
    } else if (strcmp(kind, "output") == 0) {
      if ((out_id = plan_id(line, &off, 1)) < 0 || sscanf(line + off, " %4095[^\n]", out_path_p) != 1)
        return fail("bad output line", line);
    } else if (strcmp(kind, "call") == 0) {
      char sym[512], full[600];
      if (n_calls == PLAN_CALLS) return fail("too many calls", NULL);
      if (sscanf(line + off, "%511s%n", sym, &used) != 1) return fail("bad call line", line);
      off += used;
      snprintf(full, sizeof full, "__tvm_ffi_%s", sym);
      PlanCall* c = &p_calls[n_calls];
      c->fn = (TVMFFISafeCallType)dlsym(lib, full);
      if (!c->fn) return fail("function not in the library", full);
      c->n = 0;
      int id;
      while ((id = plan_id(line, &off, 1)) >= 0) {
        if (c->n == MAX_ARGS) return fail("too many call arguments", line);
        c->ids[c->n++] = id;
      }
      ++n_calls;
    } else {
      return fail("unknown plan directive", kind);
    }
  }
  if (in_id < 0 || out_id < 0) return fail("plan needs an input and an output line", NULL);
  FILE* fin = fopen(in_path, "rb");
  if (!fin) return fail("cannot open input", in_path);
  FILE* fout = fopen(out_path_p, "wb");
  if (!fout) return fail("cannot write output", out_path_p);
  static TVMFFIAny cargs[MAX_ARGS];
  for (long r = 0; r < in_count; ++r) {
    if (!read_exact(fin, p_tensors[in_id].data, p_bytes[in_id]))
      return fail("input file is shorter than its count", in_path);
    for (int i = 0; i < n_calls; ++i) {
      PlanCall* c = &p_calls[i];
      for (int a = 0; a < c->n; ++a) {
        memset(&cargs[a], 0, sizeof cargs[a]);
        cargs[a].type_index = kTVMFFIDLTensorPtr;
        cargs[a].v_ptr = &p_tensors[c->ids[a]];
      }
      TVMFFIAny result;
      memset(&result, 0, sizeof result);
      int rc = c->fn(NULL, cargs, c->n, &result);
      if (rc != 0) {
        fprintf(stderr, "tb_arm_harness: call %d of run %ld returned %d\n", i, r, rc);
        return 3;
      }
    }
    if (fwrite(p_tensors[out_id].data, 1, p_bytes[out_id], fout) != p_bytes[out_id])
      return fail("short write", out_path_p);
  }
  fclose(fin);
  if (fclose(fout) != 0) return fail("short write", out_path_p);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s KERNEL.so MANIFEST\n", argv[0]);
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) return fail("dlopen failed", dlerror());
  void** slot;
  if ((slot = (void**)dlsym(lib, "__TVMBackendParallelLaunch"))) *slot = (void*)serial_parallel_launch;
  if ((slot = (void**)dlsym(lib, "__TVMBackendAllocWorkspace"))) *slot = (void*)alloc_workspace;
  if ((slot = (void**)dlsym(lib, "__TVMBackendFreeWorkspace"))) *slot = (void*)free_workspace;
  if (dlsym(lib, "__TVMBackendParallelBarrier"))
    return fail("kernel uses parallel barriers, which this serial harness cannot run", NULL);

  FILE* mf = fopen(argv[2], "r");
  if (!mf) return fail("cannot open manifest", argv[2]);
  {
    char first[64];
    long pos = ftell(mf);
    if (fgets(first, sizeof first, mf) && strncmp(first, "plan", 4) == 0 &&
        (first[4] == '\n' || first[4] == ' ' || first[4] == '\0')) {
      int rc = run_plan(lib, mf);
      fclose(mf);
      return rc;
    }
    fseek(mf, pos, SEEK_SET);
  }
  TVMFFISafeCallType fn = (TVMFFISafeCallType)dlsym(lib, "__tvm_ffi_main");
  if (!fn) return fail("no __tvm_ffi_main in the library", dlerror());
  static DLTensor tensors[MAX_ARGS];
  static int64_t shapes[MAX_ARGS][MAX_DIMS];
  static TVMFFIAny args[MAX_ARGS];
  static char out_path[4096];
  int n_args = 0, out_idx = -1;
  size_t out_bytes = 0;
  char line[8192];
  while (fgets(line, sizeof line, mf)) {
    char kind[8];
    int off = 0, used = 0;
    if (sscanf(line, "%7s%n", kind, &off) != 1) continue;
    if (strcmp(kind, "tasks") == 0) {
      if (sscanf(line + off, "%d", &g_tasks) != 1 || g_tasks < 1) return fail("bad tasks line", line);
      continue;
    }
    int is_out = strcmp(kind, "out") == 0;
    if (!is_out && strcmp(kind, "in") != 0) return fail("unknown manifest directive", kind);
    if (n_args == MAX_ARGS) return fail("too many arguments", NULL);
    int code, bits, ndim;
    if (sscanf(line + off, "%d %d %d%n", &code, &bits, &ndim, &used) != 3 || ndim < 0 ||
        ndim > MAX_DIMS || bits % 8)
      return fail("bad tensor line", line);
    off += used;
    size_t count = 1;
    for (int d = 0; d < ndim; ++d) {
      long long v;
      if (sscanf(line + off, "%lld%n", &v, &used) != 1 || v < 0) return fail("bad shape", line);
      off += used;
      shapes[n_args][d] = (int64_t)v;
      count *= (size_t)v;
    }
    char path[4096];
    if (sscanf(line + off, " %4095[^\n]", path) != 1) return fail("missing file name", line);
    size_t nbytes = count * (size_t)(bits / 8);
    void* data = NULL;
    if (posix_memalign(&data, 64, nbytes ? nbytes : 64)) return fail("out of memory", NULL);
    if (is_out) {
      if (out_idx >= 0) return fail("more than one out line", NULL);
      memset(data, 0xFF, nbytes);
      out_idx = n_args;
      out_bytes = nbytes;
      strcpy(out_path, path);
    } else {
      FILE* f = fopen(path, "rb");
      if (!f) return fail("cannot open input", path);
      size_t got = fread(data, 1, nbytes, f);
      fclose(f);
      if (got != nbytes) return fail("input file is shorter than its shape", path);
    }
    DLTensor* t = &tensors[n_args];
    memset(t, 0, sizeof *t);
    t->data = data;
    t->device.device_type = kDLCPU;
    t->device.device_id = 0;
    t->ndim = ndim;
    t->dtype.code = (uint8_t)code;
    t->dtype.bits = (uint8_t)bits;
    t->dtype.lanes = 1;
    t->shape = shapes[n_args];
    memset(&args[n_args], 0, sizeof args[n_args]);
    args[n_args].type_index = kTVMFFIDLTensorPtr;
    args[n_args].v_ptr = t;
    ++n_args;
  }
  fclose(mf);
  if (out_idx < 0) return fail("manifest has no out line", NULL);

  TVMFFIAny result;
  memset(&result, 0, sizeof result);
  int rc = fn(NULL, args, n_args, &result);
  if (rc != 0) {
    fprintf(stderr, "tb_arm_harness: kernel returned %d\n", rc);
    return 3;
  }
  FILE* f = fopen(out_path, "wb");
  if (!f) return fail("cannot write output", out_path);
  size_t put = fwrite(tensors[out_idx].data, 1, out_bytes, f);
  if (fclose(f) != 0 || put != out_bytes) return fail("short write", out_path);
  return 0;
}
