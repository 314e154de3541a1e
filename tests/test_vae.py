"""The Stable Diffusion VAE: PyTorch (diffusers) parity, the converter's schemas and its refusals.

Reference models are diffusers AutoencoderKLs with every parameter random (GroupNorm affines
included), saved with save_pretrained and converted through the CLI's in-process path. The real
sd-vae geometry runs once at 32x32 pixels (module-scoped fixtures); schemas, sampling and refusals
use a tiny geometry.
"""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dydit_jax import checkpoints
from dydit_jax.errors import UserError
from dydit_jax.models import ModelConfig
from dydit_jax.vae import SD_VAE, VAEConfig, load_vae, tiny_vae_config
from dydit_jax.vae import convert as vae_convert
from vae_helpers import (PARITY_RTOL, convert_main, diffusers_vae, jitted, ldm_names, legacy_names, nchw, nhwc,
                         params, rel_l2, torch_vae)

TINY = tiny_vae_config()
TINY_GROUPS = ("--norm_num_groups", str(TINY.norm_num_groups))
# bfloat16 decode vs float32 decode, relative L2 (observed ~0.02 on the random real-geometry VAE:
# bfloat16 keeps ~3 significant digits through ~30 convolutions).
BF16_RTOL = 0.05


def _converted(tmp_path_factory, name: str, cfg: VAEConfig, seed: int) -> SimpleNamespace:
  root = tmp_path_factory.mktemp(name)
  ref = torch_vae(cfg, seed)
  ref.save_pretrained(root / "src")
  code, out, err = convert_main(root / "src", root / "out")
  assert code == 0, err
  return SimpleNamespace(root=root, ref=ref, src=root / "src", dst=root / "out", stdout=out,
                         model=load_vae(root / "out"))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
  """The sd-vae-ft-ema / -mse geometry with random weights, converted; 32x32 inputs, 4x4 latents."""
  r = _converted(tmp_path_factory, "real", SD_VAE, seed=0)
  gen = torch.Generator().manual_seed(0)
  r.x, r.z = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(1, 4, 4, 4, generator=gen)
  with torch.no_grad():
    r.posterior, r.decoded = r.ref.encode(r.x).latent_dist, r.ref.decode(r.z).sample
  r.jax_decoded = jitted(r.model, "decode")(jnp.asarray(nhwc(r.z)))
  return r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A two-block VAE (widths 32, 64, 8 groups), converted; a batch of two 16x16 images."""
  t = _converted(tmp_path_factory, "tiny", TINY, seed=1)
  gen = torch.Generator().manual_seed(1)
  t.x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
  with torch.no_grad():
    t.posterior = t.ref.encode(t.x).latent_dist
  t.jax_posterior = jitted(t.model, "encode")(jnp.asarray(nhwc(t.x)))
  return t


# Parity with diffusers -----------------------------------------------------------------------------
def test_real_geometry_converts_every_tensor(real):
  assert "(248 tensors, 83,653,863 parameters)" in real.stdout
  assert len(real.ref.state_dict()) == 248 and len(params(real.model)) == 248
  assert sum(v.size for v in params(real.model).values()) == 83_653_863
  assert real.model.config == SD_VAE
  assert json.loads((real.dst / "vae_config.json").read_text())["block_out_channels"] == [128, 256, 512, 512]


def test_real_geometry_encode_matches_diffusers(real):
  posterior = jitted(real.model, "encode")(jnp.asarray(nhwc(real.x)))
  errors = {"mean": rel_l2(nchw(posterior.mean), real.posterior.mean),
            "std": rel_l2(nchw(posterior.std), real.posterior.std),
            "logvar": rel_l2(nchw(posterior.logvar), real.posterior.logvar)}
  print(f"real-geometry encode, relative L2: {errors}")
  assert max(errors.values()) <= PARITY_RTOL, errors


def test_real_geometry_decode_matches_diffusers(real):
  error = rel_l2(nchw(real.jax_decoded), real.decoded)
  print(f"real-geometry decode, relative L2: {error:.3g}")
  assert real.jax_decoded.shape == (1, 32, 32, 3) and real.jax_decoded.dtype == jnp.float32
  assert error <= PARITY_RTOL


def test_bfloat16_decode_is_close_to_float32(real):
  model = load_vae(real.dst, dtype="bfloat16")
  decoded = jitted(model, "decode")(jnp.asarray(nhwc(real.z)))
  error = rel_l2(decoded, real.jax_decoded)
  print(f"bfloat16 vs float32 decode, relative L2: {error:.3g}")
  assert decoded.dtype == jnp.float32 and error <= BF16_RTOL


def test_tiny_encode_decode_and_dit_scale_match_diffusers(tiny):
  post, ref = tiny.jax_posterior, tiny.posterior
  assert rel_l2(nchw(post.mean), ref.mean) <= PARITY_RTOL
  assert rel_l2(nchw(post.std), ref.std) <= PARITY_RTOL
  x, s = jnp.asarray(nhwc(tiny.x)), TINY.scaling_factor
  with torch.no_grad():
    reconstruction = tiny.ref(tiny.x).sample                          # decode(mode)
    decoded = tiny.ref.decode(ref.mean * 0.5).sample
  assert rel_l2(nchw(jitted(tiny.model, "__call__")(x)), reconstruction) <= PARITY_RTOL
  latents = jitted(tiny.model, "encode_latents")(x)                    # mode x scaling_factor
  np.testing.assert_allclose(latents, np.asarray(post.mean) * s, rtol=1e-6, atol=1e-7)
  assert rel_l2(nchw(jitted(tiny.model, "decode_latents")(latents * 0.5)), decoded) <= PARITY_RTOL


def test_posterior_sample_matches_diffusers_with_the_same_noise(tiny):
  with torch.no_grad():
    torch_sample = tiny.posterior.sample(generator=torch.Generator().manual_seed(7))
  noise = torch.randn(torch_sample.shape, generator=torch.Generator().manual_seed(7))
  sample = tiny.jax_posterior.sample(noise=jnp.asarray(nhwc(noise)))
  assert rel_l2(nchw(sample), torch_sample) <= PARITY_RTOL

  key = jax.random.key(3)
  drawn = tiny.jax_posterior.sample(key)
  expected = tiny.jax_posterior.mean + tiny.jax_posterior.std * jax.random.normal(key, drawn.shape)
  np.testing.assert_allclose(drawn, expected, rtol=1e-6, atol=1e-7)
  latents = jitted(tiny.model, "encode_latents")(jnp.asarray(nhwc(tiny.x)), key)
  np.testing.assert_allclose(latents, np.asarray(drawn) * TINY.scaling_factor, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="PRNG key or the noise"):
    tiny.jax_posterior.sample()


# Schemas and input formats -------------------------------------------------------------------------
def _assert_same(model_dir, reference):
  model = load_vae(model_dir)
  assert model.config == reference.config
  got, want = params(model), params(reference)
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_legacy_ldm_bin_and_pipeline_inputs_give_identical_params(tiny, tmp_path):
  sd = {k: v.contiguous() for k, v in tiny.ref.state_dict().items()}
  save_file(legacy_names(sd), tmp_path / "legacy.safetensors")
  ldm = {f"first_stage_model.{k}": v for k, v in ldm_names(sd, len(TINY.block_out_channels)).items()}
  others = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3), "cond_stage_model.proj": torch.ones(2),
            "model_ema.decay": torch.tensor(0.999)}
  torch.save({"state_dict": {**ldm, **others}, "global_step": 10}, tmp_path / "sd.ckpt")
  save_file({**{k.replace("first_stage_model.", "vae."): v.contiguous() for k, v in ldm.items()}, **others},
            tmp_path / "sd.safetensors")
  tiny.ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
  shutil.copytree(tiny.src, tmp_path / "pipeline" / "vae")

  code, _, err = convert_main(tmp_path / "legacy.safetensors", tmp_path / "from_legacy", *TINY_GROUPS)
  assert code == 0 and "legacy diffusers" in err and "assumed scaling_factor 0.18215" in err, err
  _assert_same(tmp_path / "from_legacy", tiny.model)
  code, _, err = convert_main(tmp_path / "sd.ckpt", tmp_path / "from_ldm", *TINY_GROUPS)
  assert code == 0 and "ignored 3 entries outside the VAE" in err and "LDM" in err, err
  _assert_same(tmp_path / "from_ldm", tiny.model)
  code, _, err = convert_main(tmp_path / "sd.safetensors", tmp_path / "from_ldm_st", *TINY_GROUPS)
  assert code == 0 and "under 'vae.'" in err, err
  _assert_same(tmp_path / "from_ldm_st", tiny.model)
  for name in ("bin", "pipeline"):
    assert convert_main(tmp_path / name, tmp_path / f"from_{name}")[0] == 0
    _assert_same(tmp_path / f"from_{name}", tiny.model)


def test_half_precision_files_are_cast_to_float32(tiny, tmp_path):
  sd = tiny.ref.state_dict()
  for dtype in (torch.float16, torch.bfloat16):
    name = str(dtype).removeprefix("torch.")
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, tmp_path / f"{name}.safetensors")
    code, _, err = convert_main(tmp_path / f"{name}.safetensors", tmp_path / name, *TINY_GROUPS)
    assert code == 0 and "-> float32" in err, err
    got = params(load_vae(tmp_path / name))
    for path, value in params(tiny.model).items():    # rounding commutes with the layout change
      np.testing.assert_array_equal(got[path], torch.tensor(value).to(dtype).float().numpy(), err_msg=str(path))


@pytest.mark.parametrize("schema", ["diffusers", "legacy", "ldm"])
def test_real_geometry_key_table_in_every_schema(schema):
  """Shapes only (a meta-device model): every schema of the real geometry renames onto the table."""
  with torch.device("meta"):
    sd = diffusers_vae(SD_VAE).state_dict()
  renamed = {"diffusers": sd, "legacy": legacy_names(sd), "ldm": ldm_names(sd, 4)}[schema]
  arrays = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in renamed.items()}   # shapes, no memory
  state, source, duplicates = vae_convert.to_diffusers_names(arrays, [])
  assert len(state) == 248 and not duplicates
  shapes = {k: v.shape for k, v in state.items()}
  assert shapes == {k: tuple(v.shape) for k, v in sd.items()}
  cfg = vae_convert.infer_config(shapes, [])
  assert cfg == SD_VAE
  vae_convert.check_keys(shapes, source, duplicates, cfg, vae_convert.abstract_shapes(cfg))


def test_model_directories_are_not_mixed_up(real, tmp_path):
  with pytest.raises(FileNotFoundError, match="holds a VAE"):
    checkpoints.load_model(real.dst)
  (tmp_path / "dit" / checkpoints.PARAMS_DIR).mkdir(parents=True)      # what load_vae looks at of a DiT directory
  (tmp_path / "dit" / checkpoints.CONFIG_FILE).write_text(ModelConfig().to_json())
  with pytest.raises(FileNotFoundError, match="holds a DiT model"):
    load_vae(tmp_path / "dit")


def test_config_round_trip_and_validation():
  cfg = tiny_vae_config(latent_channels=16, dtype="bfloat16")
  assert VAEConfig.from_json(cfg.to_json()) == cfg and cfg.geometry().dtype == "float32"
  assert SD_VAE.downsample_factor == 8 and SD_VAE.latent_size(256) == 32
  for bad, words in [(dict(norm_num_groups=48), "does not divide"), (dict(dtype="float16"), "dtype"),
                     (dict(block_out_channels=()), "non-empty")]:
    with pytest.raises(UserError, match=words):
      tiny_vae_config(**bad)
  with pytest.raises(UserError, match="unknown VAE config fields"):
    VAEConfig.from_dict({"block_out_channels": [32], "act_fn": "silu"})


# Refusals: non-zero exit, one message, nothing written -----------------------------------------------
def _bad_inputs(tiny, root):
  """name -> (source, extra flags, words expected in the one error line)."""
  sd = {k: v.contiguous() for k, v in tiny.ref.state_dict().items()}
  cases = {}
  broken = dict(sd)
  del broken["decoder.up_blocks.1.resnets.1.conv2.bias"]
  broken["encoder.down_blocks.0.resnets.0.extra.weight"] = torch.zeros(3)
  broken["encoder.mid_block.attentions.0.to_q.bias"] = torch.zeros(7)
  save_file(broken, root / "broken.safetensors")
  cases["missing_unexpected_mismatched"] = (
      root / "broken.safetensors", TINY_GROUPS,
      "1 missing, 1 unexpected, 1 mismatched; missing: decoder.up_blocks.1.resnets.1.conv2.bias; "
      "unexpected: encoder.down_blocks.0.resnets.0.extra.weight; "
      "mismatched: encoder.mid_block.attentions.0.to_q.bias (7,) (expected (64,))")
  save_file({**sd, **{k: v.clone() for k, v in legacy_names(sd).items() if "query" in k}}, root / "twice.safetensors")
  cases["duplicate"] = (root / "twice.safetensors", TINY_GROUPS, "4 given twice")

  data = (tiny.src / "diffusion_pytorch_model.safetensors").read_bytes()
  (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
  cases["truncated_safetensors"] = (root / "truncated.safetensors", TINY_GROUPS, "truncated or corrupt")
  torch.save({"state_dict": sd}, root / "full.ckpt")
  data = (root / "full.ckpt").read_bytes()
  (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
  cases["truncated_ckpt"] = (root / "truncated.ckpt", TINY_GROUPS, "truncated or corrupt")

  torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)).state_dict(), root / "other.pt")
  cases["not_a_vae"] = (root / "other.pt", (), "not an AutoencoderKL state dict")
  cases["groups_do_not_divide"] = (root / "full.ckpt", ("--norm_num_groups", "48"), "does not divide")
  cases["flag_contradicts_config"] = (tiny.src, ("--norm_num_groups", "16"), "contradicts config.json")
  unsupported = root / "gelu"
  shutil.copytree(tiny.src, unsupported)
  config = json.loads((unsupported / "config.json").read_text())
  (unsupported / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
  cases["unsupported_config"] = (unsupported, (), "act_fn 'gelu'")
  cases["no_source"] = (root / "nothing.safetensors", (), "does not exist")
  return cases


def test_bad_inputs_fail_cleanly(tiny, tmp_path):
  sources = tmp_path / "src"
  sources.mkdir()
  for name, (src, flags, words) in _bad_inputs(tiny, sources).items():
    dst = tmp_path / name
    code, out, err = convert_main(src, dst, *flags)
    assert code == 1 and not out, name
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
    assert words in err, (name, err)
    assert not dst.exists(), name
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]      # no temporary directories left behind


def test_existing_destination_is_refused_and_overwrite_replaces(tiny, tmp_path):
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("precious")
  code, _, err = convert_main(tiny.src, dst)
  assert code == 1 and err.startswith("error: ") and "already exists and is not empty" in err
  assert [p.name for p in dst.iterdir()] == ["keep.txt"]
  assert convert_main(tiny.src, dst, "--overwrite")[0] == 0
  _assert_same(dst, tiny.model)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(checkpoints.ocp.StandardCheckpointer, "save", fail)
  with pytest.raises(OSError, match="disk full"):
    convert_main(tiny.src, tmp_path / "out")
  assert list(tmp_path.iterdir()) == []


def test_cost_benchmark_counts_a_decode():
  from dydit_jax.bench import vae as vae_bench
  r = vae_bench.measure(image_size=32, batch=1, run=False)      # compile only, abstract weights
  assert r["decode"]["gmacs_per_image"] > r["encode"]["gmacs_per_image"] > 0
  # Convolutions dominate: cost per pixel is about constant, 307.9 GMACs at 256 px (docs/benchmarks.md).
  assert 0.8 < r["decode"]["gmacs_per_image"] * 64 / 307.9 < 1.2
