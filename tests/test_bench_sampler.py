"""scripts/bench_sampler.py: the roofline's counts, the timing helpers, an end-to-end run.

Nothing here is timed: the counts are checked against hand-computed values, the model's
own parameter tree and XLA's count; the run only has to produce every number.
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from deranj import profiling  # noqa: E402
from deranj.models import base  # noqa: E402
from deranj.models import build  # noqa: E402
from deranj.models import t5  # noqa: E402
from scripts import bench_sampler  # noqa: E402


def _cfg(**kw):
  shape = dict(vocab_size=10, d_model=8, d_kv=2, d_ff=16, num_heads=2, num_layers=1,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
  shape.update(kw)
  return build.T5Config(**shape)


def test_decode_step_cost_by_hand():
  # D 8, H*K 4, F 16 gated, V 10, 1 layer, 32 buckets; 2 models, 3 rows of 1 prompt of 5
  # tokens, position 2 (3 cached positions seen).
  parts = bench_sampler.decode_step_cost(_cfg(), models=2, rows=3, prompts=1, prompt_len=5,
                                         position=2)
  # layer matmul weights 4*8*4 + 2*8*4 + 3*8*16 = 576; norms (3+1)*8 + relpos 32*2 +
  # embedding rows 3*8 = 120; bytes 2 models * 4 * 696; FLOPs 2 models * 2 * 3 rows * 576.
  assert parts["decoder weights"] == (5568, 6912)
  # read K and V over 3 positions, write 1: 2 * 4 * 2 * 3 rows * 4 * (3 + 1);
  # scores + contexts: 2 * 2 * 2 * 3 rows * 4 * 3.
  assert parts["self-attention cache"] == (768, 288)
  # K and V of one prompt: 2 * 4 * 2 * 1 * 5 * 4; scores + contexts for 3 rows over 5.
  assert parts["cross-attention K/V"] == (320, 480)
  assert parts["output heads"] == (2 * 4 * 8 * 10, 2 * 2 * 3 * 8 * 10)
  # logits written and read once: 2 * 4 * 2 models * 3 rows * 10; 3 * 10 * (7 * 2 + 8).
  assert parts["vocabulary ops"] == (480, 660)


def _abstract_params(cfg):
  """The parameter tree's shapes and dtypes, each leaf with its nbytes: what the counts
  read (flax's init, run op by op, compiles each of its small ops)."""
  model = base.EncoderDecoderModel(build.network(cfg))
  return jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype),
                                jax.eval_shape(model.init_params, jax.random.PRNGKey(0)))


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True, "feed_forward_proj": "relu"},
                                {"num_layers": 2, "num_decoder_layers": 3}])
def test_weight_bytes_match_the_parameter_tree(kw):
  cfg = _cfg(**kw)
  params = _abstract_params(cfg)
  streamed = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params["decoder"]):
    names = [getattr(p, "key", "") for p in path]
    cross_kv = "encoder_decoder_attention" in names and ("key" in names or "value" in names)
    if not cross_kv and "logits_dense" not in names:
      streamed += leaf.nbytes
  head = (params["token_embedder"]["embedding"] if cfg.tie_word_embeddings
          else params["decoder"]["logits_dense"]["kernel"])
  rows = 3
  parts = bench_sampler.decode_step_cost(cfg, models=1, rows=rows, prompts=rows, prompt_len=4,
                                         position=0)
  assert parts["decoder weights"][0] == streamed + rows * cfg.d_model * 4  # + embedding rows
  assert parts["output heads"][0] == head.nbytes


def test_matmul_flops_match_xla():
  cfg, rows = _cfg(num_layers=2), 3
  params = _abstract_params(cfg)
  x = jnp.ones((rows, cfg.d_model), jnp.float32)
  parts = bench_sampler.decode_step_cost(cfg, models=2, rows=rows, prompts=rows, prompt_len=4,
                                         position=0)
  heads = profiling.xla_cost(lambda p, x: bench_sampler.output_heads([cfg] * 2, p, x),
                             (params, params), x)
  assert heads["flops"] == parts["output heads"][1]  # pure matmuls
  mm = profiling.xla_cost(lambda p, x: bench_sampler.decoder_matmuls([cfg] * 2, p, x),
                          (params, params), x)
  # XLA also counts the element-wise adds and the gate's product, at most one FLOP per
  # element of each q/k/v sum, residual and MLP hidden.
  hk = cfg.num_heads * cfg.d_kv
  elementwise = 2 * cfg.decoder_layers * rows * (3 * hk + 3 * cfg.d_model + cfg.d_ff)
  assert parts["decoder weights"][1] <= mm["flops"] <= parts["decoder weights"][1] + elementwise
  # The same count with the kernels as the decoding steps read them: transposed and fused,
  # or fused in the stored layout.
  hk = cfg.num_heads * cfg.d_kv
  for transpose in (True, False):
    c = dataclasses.replace(cfg, transpose_decode_kernels=transpose)
    model = base.EncoderDecoderModel(t5.Transformer(c))
    stepping = jax.eval_shape(lambda p: bench_sampler.step_kernels([model] * 2, (p, p)), params)
    block = stepping[0]["decoder"]["layers_0"]["self_attention"]
    fused = block[t5.FUSED_STEP_KERNEL] if transpose else block[bench_sampler.FUSED_STORED]
    assert fused.shape == ((3 * hk, cfg.d_model) if transpose else (cfg.d_model, 3 * hk))
    mm = profiling.xla_cost(lambda p, x: bench_sampler.decoder_matmuls([c] * 2, p, x),
                            stepping, x)
    assert parts["decoder weights"][1] <= mm["flops"] <= parts["decoder weights"][1] + elementwise
    heads = profiling.xla_cost(lambda p, x: bench_sampler.output_heads([c] * 2, p, x),
                               stepping, x)
    assert heads["flops"] == parts["output heads"][1]


def test_roofline_sums_the_steps():
  cfg = _cfg()
  kw = dict(models=2, rows=3, prompts=1, prompt_len=5)
  per_step = [bench_sampler.decode_step_cost(cfg, position=t, **kw) for t in range(4)]
  nbytes = [sum(b for b, _ in p.values()) for p in per_step]
  flops = [sum(f for _, f in p.values()) for p in per_step]
  memory = bench_sampler.roofline(cfg, steps=4, read_bw=2.0, matmul_rate=np.inf, **kw)
  assert memory["floor_s"] == memory["memory_floor_s"] == pytest.approx(sum(nbytes) / 2.0,
                                                                       rel=1e-12)
  assert memory["memory_bound_steps"] == 4
  compute = bench_sampler.roofline(cfg, steps=4, read_bw=np.inf, matmul_rate=3.0, **kw)
  assert compute["floor_s"] == pytest.approx(sum(flops) / 3.0, rel=1e-12)
  assert compute["memory_bound_steps"] == 0
  assert compute["bytes_per_step"] == pytest.approx(np.mean(nbytes), rel=1e-12)
  # Each step takes the larger bound: between the two pure floors' max and their sum.
  both = bench_sampler.roofline(cfg, steps=4, read_bw=2.0, matmul_rate=3.0, **kw)
  assert max(memory["floor_s"], compute["floor_s"]) <= both["floor_s"]
  assert both["floor_s"] <= memory["floor_s"] + compute["floor_s"]


def test_weight_matmuls_cover_the_decoder_and_head_flops():
  # D 8, H*K 4, F 16 gated, V 10, 1 layer, 3 rows: fused q|k|v [3,8]x[8,12], self and
  # cross o [3,4]x[4,8] twice, cross q [3,8]x[8,4], wi_0|wi_1 [3,8]x[8,32], wo
  # [3,16]x[16,8], head [3,8]x[8,10].
  cfg = _cfg()
  shapes = bench_sampler.weight_matmuls(cfg, rows=3)
  assert shapes == {(3, 8, 12): 1, (3, 4, 8): 2, (3, 8, 4): 1, (3, 8, 32): 1, (3, 16, 8): 1,
                    (3, 8, 10): 1}
  parts = bench_sampler.decode_step_cost(cfg, models=1, rows=3, prompts=1, prompt_len=5,
                                         position=0)
  flops = sum(2 * np.prod(sh) * c for sh, c in shapes.items())
  assert flops == parts["decoder weights"][1] + parts["output heads"][1]


def test_roofline_at_each_shapes_rate():
  cfg = _cfg()
  kw = dict(models=2, rows=3, prompts=1, prompt_len=5, steps=4, read_bw=np.inf)
  shapes = bench_sampler.weight_matmuls(cfg, rows=3)
  one_rate = bench_sampler.roofline(cfg, matmul_rate=3.0, **kw)
  same = bench_sampler.roofline(cfg, matmul_rate={sh: 3.0 for sh in shapes}, **kw)
  assert same["floor_s"] == pytest.approx(one_rate["floor_s"], rel=1e-12)
  # One shape 4x slower: the compute floor grows by exactly its FLOPs at the new rate
  # less the old (2 models x 4 steps x its FLOPs; the rest keeps the best rate, 3).
  slow = (3, 8, 32)
  rates = {sh: (0.75 if sh == slow else 3.0) for sh in shapes}
  slowed = bench_sampler.roofline(cfg, matmul_rate=rates, **kw)
  extra = 2 * 4 * 2 * np.prod(slow) * (1 / 0.75 - 1 / 3.0)
  assert slowed["compute_floor_s"] == pytest.approx(one_rate["compute_floor_s"] + extra,
                                                    rel=1e-12)
  # The head at its own rate: only the "output heads" part moves.
  head = (3, 8, 10)
  rates = {sh: (1.0 if sh == head else 3.0) for sh in shapes}
  by_part = bench_sampler.roofline(cfg, matmul_rate=rates, **kw)["per_step_by_part"]
  assert by_part["output heads"]["floor_s"] == pytest.approx(2 * 2 * np.prod(head), rel=1e-12)
  assert by_part["decoder weights"]["floor_s"] == pytest.approx(
      one_rate["per_step_by_part"]["decoder weights"]["floor_s"], rel=1e-12)


def test_part_by_part_floor_is_never_below_the_step_floor():
  cfg = _cfg()
  kw = dict(models=2, rows=3, prompts=1, prompt_len=5, steps=4)
  for read_bw, rate in ((2.0, 3.0), (2.0, np.inf), (np.inf, 3.0), (1e3, 5.0)):
    rl = bench_sampler.roofline(cfg, read_bw=read_bw, matmul_rate=rate, **kw)
    assert rl["floor_by_part_s"] >= rl["floor_s"] * (1 - 1e-12)
    assert rl["floor_by_part_s"] == pytest.approx(
        kw["steps"] * sum(p["floor_s"] for p in rl["per_step_by_part"].values()), rel=1e-12)
  # Memory-only or compute-only: nothing to overlap, the two floors agree.
  memory = bench_sampler.roofline(cfg, read_bw=2.0, matmul_rate=np.inf, **kw)
  assert memory["floor_by_part_s"] == pytest.approx(memory["floor_s"], rel=1e-12)


def test_interleaved_rounds_rotate_the_arms():
  calls = []
  arms = {name: (lambda name=name: calls.append(name)) for name in "abc"}
  lines = []
  times = profiling.interleaved_rounds(arms, 4, log=lines.append)
  assert calls == list("abc" "bca" "cab" "abc")
  assert [line.split(":")[0] for line in lines] == [f"round {i}/4" for i in (1, 2, 3, 4)]
  assert all(len(t) == 4 and min(t) >= 0 for t in times.values())
  assert profiling.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}


def test_matmul_probe_repeats_the_product():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
  got = profiling._repeated_matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 7)
  want = sum((a + i) @ b for i in range(7))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  got = profiling._repeated_matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b.T, jnp.float32),
                                   7, minor=True)  # the operand stored [n, k]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  probes = profiling.Probes({"tiny": (2, 3, 4)}, megabytes=1, repeats=1)
  (_, _, flops, reps), = probes._matmuls.values()
  assert reps == min(profiling.MATMUL_LOOP_MAX_REPS, np.ceil(profiling.MATMUL_LOOP_FLOPS / 48))
  assert flops == reps * 48
  assert probes.measure()["matmul tiny"] > 0


def test_cpu_description_names_the_model_and_its_vector_units(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 fma avx512f "
                  "amx_tile\n\nprocessor\t: 1\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2\n")
  assert profiling.cpu_description(str(info)) == "Some Xeon (avx2, avx512f, amx_tile)"
  assert profiling.cpu_description(str(tmp_path / "missing")) == "unknown CPU"


def test_attention_bench_arms_agree_on_a_tiny_shape(capsys):
  from scripts import bench_attention  # pylint: disable=g-import-not-at-top
  bench_attention.main(["--small", "--rounds", "1"])  # asserts the arms' agreement itself
  out = capsys.readouterr().out
  for arm in ("as the step computes it", "keys [B,H,K,S], reduce", "read K/V once (reduce)",
              "floor (bytes ÷ streaming read)"):
    assert f"| {arm} |" in out
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 4), (2, 3, 5, 4),
                                                                   (2, 3, 5, 4)))
  w = np.exp(np.einsum("bhk,bhsk->bhs", q, k))
  w /= w.sum(-1, keepdims=True)
  want = np.einsum("bhs,bhsk->bhk", w, v)
  for scores, weighted, transposed in bench_attention.ARMS.values():
    kk = np.swapaxes(k, 2, 3) if transposed else k
    got = weighted(jax.nn.softmax(scores(jnp.asarray(q), jnp.asarray(kk)), -1), jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_xla_cost_counts_a_matmul():
  cost = profiling.xla_cost(jnp.matmul, jnp.ones((3, 4)), jnp.ones((4, 5)))
  assert cost["flops"] == 2 * 3 * 4 * 5


def _run(*flags):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_sampler.py"),
                         *flags], env=env, capture_output=True, text=True, timeout=600)


def test_unknown_arm_is_one_line():
  proc = _run("--arms", "dera,hff")
  assert proc.returncode == 2
  assert "--arms: unknown arm(s) hff" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_runs_end_to_end_on_a_tiny_shape(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run("--small", "--batch", "2", "--prompt_len", "8", "--new_tokens", "3",
              "--rounds", "2", "--arms", "dera,prefill,ref", "--json", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert set(report["arms"]) == {"dera", "prefill", "ref"}
  for arm in report["arms"].values():
    assert len(arm["times"]) == 2 and arm["min"] <= arm["median"] <= arm["max"]
    assert arm["floor_s"] > 0
  assert report["compiles"] == {"first DeRa call": 1}
  assert len(report["probes"]["rounds"]) == 2
  assert report["roofline"]["dera"]["steps"] == 3
  pieces = {row["piece"] for row in report["profile"]}
  assert any(p.startswith("decoder matmuls") for p in pieces)
  assert any(p.startswith("sampler vocabulary ops") for p in pieces)
  assert "| deranj DeRa |" in proc.stdout
  assert "decode loop (DeRa - prefill) / decode floor" in proc.stdout
  assert "decode loop / decode floor summed part by part" in proc.stdout
  rates = report["roofline"]["decode_matmul_rates"]["2"]
  assert len(rates) == len(bench_sampler.weight_matmuls(
      build.T5Config(**report["config"]["shape"]), rows=2))
  assert all(r > 0 for r in rates.values())
  assert any("floor_s" in row for row in report["profile"])
