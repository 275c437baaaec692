"""parallel/kernel_stats.py's kernel and traffic count of a loop body and of a whole program,
on a hand-written program (and parallel/hlo_stats.py's trip counts of its loops)."""

from parallel.hlo_stats import split_computations, trip_count
from parallel.kernel_stats import gpu_traffic, loop_kernel_stats, program_kernel_stats

# A decode-like program in XLA:GPU's compiled-text form: a first loop (a prefill) and the
# last one (the decode loop), whose body slices a layer out of a stacked weight (a copy
# fusion), runs a cuBLAS GEMM (with its workspace), updates a cache in place, and runs a
# nested loop of known trip count 3 holding one elementwise kernel.
PROGRAM = """HloModule decode

%fused_slice (p0: bf16[4,8,16], p1: s32[]) -> bf16[1,8,16] {
  %p0 = bf16[4,8,16]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  %cv = f32[4,8,16]{2,1,0} convert(%p0)
  %ds = f32[1,8,16]{2,1,0} dynamic-slice(%cv, %p1, %c0, %c0), dynamic_slice_sizes={1,8,16}
  ROOT %back = bf16[1,8,16]{2,1,0} convert(%ds)
}

%fused_update (q0: f32[4,2,16], q1: f32[1,2,16], q2: s32[]) -> f32[4,2,16] {
  %q0 = f32[4,2,16]{2,1,0} parameter(0)
  %q1 = f32[1,2,16]{2,1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[4,2,16]{2,1,0} dynamic-update-slice(%q0, %q1, %q2, %z, %z)
}

%fused_add (a0: f32[2,16], a1: f32[2,16]) -> f32[2,16] {
  %a0 = f32[2,16]{1,0} parameter(0)
  %a1 = f32[2,16]{1,0} parameter(1)
  ROOT %sum = f32[2,16]{1,0} add(%a0, %a1)
}

%inner_body (s: (s32[], f32[2,16])) -> (s32[], f32[2,16]) {
  %s = (s32[], f32[2,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %h = f32[2,16]{1,0} get-tuple-element(%s), index=1
  %added = f32[2,16]{1,0} fusion(%h, %h), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], f32[2,16]{1,0}) tuple(%i, %added)
}

%inner_cond (s: (s32[], f32[2,16])) -> pred[] {
  %s = (s32[], f32[2,16]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

%decode_body (d: (s32[], bf16[4,8,16], f32[4,2,16], bf16[2,8])) -> (s32[], bf16[4,8,16], f32[4,2,16], bf16[2,8]) {
  %d = (s32[], bf16[4,8,16]{2,1,0}, f32[4,2,16]{2,1,0}, bf16[2,8]{1,0}) parameter(0)
  %step = s32[] get-tuple-element(%d), index=0
  %stack = bf16[4,8,16]{2,1,0} get-tuple-element(%d), index=1
  %cache = f32[4,2,16]{2,1,0} get-tuple-element(%d), index=2
  %x = bf16[2,8]{1,0} get-tuple-element(%d), index=3
  %layer = bf16[1,8,16]{2,1,0} fusion(%stack, %step), kind=kLoop, calls=%fused_slice
  %w = bf16[8,16]{1,0} bitcast(%layer)
  %gemm = (bf16[2,16]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/gemm"}
  %y = bf16[2,16]{1,0} get-tuple-element(%gemm), index=0
  %new = f32[1,2,16]{2,1,0} constant({...})
  %cache2 = f32[4,2,16]{2,1,0} fusion(%cache, %new, %step), kind=kLoop, calls=%fused_update
  %h0 = f32[2,16]{1,0} constant({...})
  %it = (s32[], f32[2,16]{1,0}) tuple(%step, %h0)
  %loop = (s32[], f32[2,16]{1,0}) while(%it), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"},"known_init_step":{"init":"0","step":"1"}}
  ROOT %out = (s32[], bf16[4,8,16]{2,1,0}, f32[4,2,16]{2,1,0}, bf16[2,8]{1,0}) tuple(%step, %stack, %cache2, %x)
}

%decode_cond (d: (s32[], bf16[4,8,16], f32[4,2,16], bf16[2,8])) -> pred[] {
  %d = (s32[], bf16[4,8,16]{2,1,0}, f32[4,2,16]{2,1,0}, bf16[2,8]{1,0}) parameter(0)
  ROOT %go = pred[] constant(true)
}

ENTRY %main (w0: bf16[4,8,16], c0: f32[4,2,16], x0: bf16[2,8]) -> f32[4,2,16] {
  %w0 = bf16[4,8,16]{2,1,0} parameter(0)
  %c0 = f32[4,2,16]{2,1,0} parameter(1)
  %x0 = bf16[2,8]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %h1 = f32[2,16]{1,0} constant({...})
  %pt = (s32[], f32[2,16]{1,0}) tuple(%zero, %h1)
  %prefill = (s32[], f32[2,16]{1,0}) while(%pt), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"4"}}
  %init = (s32[], bf16[4,8,16]{2,1,0}, f32[4,2,16]{2,1,0}, bf16[2,8]{1,0}) tuple(%zero, %w0, %c0, %x0)
  %decode = (s32[], bf16[4,8,16]{2,1,0}, f32[4,2,16]{2,1,0}, bf16[2,8]{1,0}) while(%init), condition=%decode_cond, body=%decode_body
  ROOT %r = f32[4,2,16]{2,1,0} get-tuple-element(%decode), index=2
}
"""


def test_trip_count_prefers_the_compilers_own():
  computations, entry = split_computations(PROGRAM)
  prefill, decode = [line for line in computations[entry] if " while(" in line]
  assert trip_count(prefill, computations) == 4
  assert trip_count(decode, computations) is None  # no bound: the decode loop


def test_kernels_and_traffic_of_the_decode_loop_by_hand():
  stats = loop_kernel_stats(PROGRAM)
  # The slice fusion, the GEMM, the cache update, and the nested loop's add 3 times.
  assert stats.kernels == 6
  # Slice: a quarter of the bf16[4,8,16] stack (256 B) through the convert and the s32
  # index (4 B); writes 256 B. GEMM: x 32 B + w 256 B; writes bf16[2,16] 64 B (the s8
  # workspace is not traffic). Update: the cache in place (not read), the f32[1,2,16] update
  # (128 B) and the index read, the update's 128 B written. Add: reads its operand twice
  # (2 x 128 B), writes 128 B; 3 iterations.
  assert stats.read == (256 + 4) + (32 + 256) + (128 + 4) + 3 * 256
  assert stats.written == 256 + 64 + 128 + 3 * 128
  assert stats.by_kind == {"dynamic-slice": (1, 516), "__cublas$lt$matmul": (1, 352),
                           "dynamic-update-slice": (1, 260), "": (3, 1152)}
  # One iteration of the first loop instead: the add.
  first = loop_kernel_stats(PROGRAM, loop=0)
  assert (first.kernels, first.read, first.written) == (1, 256, 128)


def test_a_reader_gives_a_custom_calls_bytes():
  """A custom call named by a reader reads what the reader says (a Pallas kernel that reads
  part of an operand), and is counted under the reader's key."""
  seen = []
  reader = lambda shapes: seen.append(shapes) or 100
  stats = loop_kernel_stats(PROGRAM, readers={"gemm": reader})
  assert seen == [["bf16[2,8]{1,0}", "bf16[8,16]{1,0}"]]
  assert stats.by_kind["gemm"] == (1, 100 + 64)
  assert stats.read == (256 + 4) + 100 + (128 + 4) + 3 * 256


def test_a_whole_program_counts_each_loop_by_its_trip_count():
  """The entry's own kernels (none here but its loops), the first loop's add 4 times, and the
  decode loop, whose bound is unknown, once."""
  whole, decode = program_kernel_stats(PROGRAM), loop_kernel_stats(PROGRAM)
  assert whole.kernels == 4 + decode.kernels
  assert (whole.read, whole.written) == (4 * 256 + decode.read, 4 * 128 + decode.written)
  assert whole.by_kind[""] == (4 + 3, 7 * (256 + 128))


def test_gpu_traffic_splits_gemms_from_the_rest():
  """The cuBLAS GEMM's bytes apart from the other kernels', whose time at the H200's 4.8 TB/s
  bounds the memory-bound work; no bandwidth for a device it does not know."""
  whole = program_kernel_stats(PROGRAM)
  traffic = gpu_traffic(PROGRAM, "NVIDIA H200 141GB HBM3e")
  gemm = whole.by_kind["__cublas$lt$matmul"][1]
  assert traffic["kernels"] == whole.kernels
  assert traffic["moved"] == dict(gemm=gemm, custom=0,
                                  other=whole.read + whole.written - gemm)
  assert traffic["other_s"] == traffic["moved"]["other"] / 4.8e12
  assert gpu_traffic(PROGRAM, "a GPU from elsewhere")["other_s"] is None
