"""ConvVAE: shapes per input size, loss, free bits, save/load, the encoding API."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from worldmodel.config import Config, resolve_config
from worldmodel.errors import ConfigError, UserError
from worldmodel.vae import (
    ConvVAE,
    LoadedVAE,
    VAEOutput,
    build_vae,
    frames_to_tensor,
    load_vae,
    save_checkpoint,
    vae_loss,
)


@pytest.mark.parametrize("size", [64, 84, 96])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("decoder", ["deconv", "broadcast"])
def test_shapes_and_dtypes_for_each_input_size(size: int, channels: int, decoder: str) -> None:
    model = ConvVAE(image_size=size, channels=channels, latent_dim=5, widths=(4, 4, 8, 8),
                    decoder=decoder)  # type: ignore[arg-type]
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert isinstance(out, VAEOutput)
    assert out.recon.shape == (2, channels, size, size)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (2, 5)
    assert all(t is not None and t.dtype == torch.float32 for t in out)
    assert 0.0 <= out.recon.min() and out.recon.max() <= 1.0
    assert model.encoder(x).shape == (2, model.feature_dim)


def test_default_model_is_world_models_v() -> None:
    model = ConvVAE()
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    assert model.feature_dim == 256 * 4 * 4
    assert model.decode(torch.zeros(3, 32)).shape == (3, 3, 64, 64)


def test_broadcast_decoder_tiles_z_over_an_8x8_grid_with_coordinates() -> None:
    model = ConvVAE(image_size=64, latent_dim=6, widths=(8, 8, 16, 16), decoder="broadcast")
    assert model.broadcast is not None and model.fc_decode is None
    assert model.broadcast.size == 8 and model.broadcast.conv1.in_channels == 6 + 2
    assert model.broadcast.coords[0, 0, 0].tolist() == pytest.approx(np.linspace(-1, 1, 8))
    ups = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(ups) == 3  # 8 -> 16 -> 32 -> 64
    assert ConvVAE(84, decoder="broadcast").broadcast.size == 10  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="deconv or broadcast"):
        ConvVAE(decoder="nope")  # type: ignore[arg-type]


def test_too_many_widths_for_the_image_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fewer widths"):
        ConvVAE(image_size=8, widths=(4, 4, 4, 4))


def test_frames_to_tensor_is_chw_float_in_unit_range() -> None:
    frames = np.zeros((2, 4, 5, 3), np.uint8)
    frames[1, 2, 3] = (255, 0, 51)
    x = frames_to_tensor(frames)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert x[1, :, 2, 3].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert torch.equal(frames_to_tensor(torch.from_numpy(frames)), x)


def test_eval_mode_uses_the_mean_and_train_mode_samples() -> None:
    model = ConvVAE(image_size=16, latent_dim=4, widths=(8, 8))
    x = torch.rand(3, 3, 16, 16)
    out = model.eval()(x)
    assert torch.equal(out.z, out.mu)
    out = model.train()(x)
    assert not torch.allclose(out.z, out.mu)


def _out(mu: torch.Tensor, logvar: torch.Tensor, recon: torch.Tensor) -> VAEOutput:
    return VAEOutput(recon, mu, logvar, mu)


def test_loss_scaling_is_sum_over_pixels_mean_over_batch() -> None:
    x = torch.zeros(2, 3, 4, 4)
    recon = torch.full_like(x, 0.5)
    zeros = torch.zeros(2, 3)
    terms = vae_loss(_out(zeros, zeros, recon), x)
    assert terms.recon.item() == pytest.approx(48 * 0.25)  # 3*4*4 pixels of 0.5^2
    assert terms.kl.item() == pytest.approx(0.0)  # N(0, 1) posterior
    bce = vae_loss(_out(zeros, zeros, recon), x, recon_loss="bce")
    assert bce.recon.item() == pytest.approx(48 * np.log(2.0), rel=1e-5)
    # KL of N(mu, 1) against N(0, 1) is mu^2 / 2 per dimension.
    mu = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    terms = vae_loss(_out(mu, torch.zeros(2, 3), recon), x, beta=2.0)
    assert terms.kl_per_dim.tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert terms.loss.item() == pytest.approx(12.0 + 2.0 * 1.5)


def test_bce_recovers_saturated_pixels_through_the_logits() -> None:
    model = ConvVAE(image_size=8, channels=1, latent_dim=2, widths=(4,))
    last = model.decoder[-1]
    assert isinstance(last, torch.nn.ConvTranspose2d) and last.bias is not None
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(30.0)  # every pixel saturated white: sigmoid(30) == 1.0 in float32
    x = torch.zeros(2, 1, 8, 8)  # ... where the frame is black
    out = model.eval()(x)
    assert out.recon.eq(1.0).all() and out.logits is not None
    terms = vae_loss(out, x, recon_loss="bce")
    assert terms.recon.item() == pytest.approx(64 * 30.0, rel=1e-4)  # softplus(30), not clamped
    terms.loss.backward()
    assert last.bias.grad is not None
    # d/dlogit of BCE = sigmoid(logit) - x = 1 per pixel: a full-size gradient, not zero
    assert last.bias.grad.item() == pytest.approx(64.0, rel=1e-4)


def test_kl_below_tolerance_is_a_constant_without_gradient() -> None:
    x = torch.zeros(1, 1, 2, 2)
    recon = torch.zeros_like(x)
    mu = torch.tensor([[0.5, 3.0]], requires_grad=True)  # KL per dim: 0.125 and 4.5
    terms = vae_loss(_out(mu, torch.zeros(1, 2), recon), x, kl_tolerance=0.5)
    assert terms.kl.item() == pytest.approx(4.625)  # reported KL is unclamped
    assert terms.loss.item() == pytest.approx(0.5 + 4.5)  # the small dim pays the tolerance
    terms.loss.backward()
    assert mu.grad is not None
    assert mu.grad[0, 0].item() == 0.0  # free: no pull towards the prior
    assert mu.grad[0, 1].item() == pytest.approx(3.0)


def _reach_frames(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    from envs.reach import ReachEnv

    env = ReachEnv(size=size)
    frames = []
    for i in range(n):
        obs, _ = env.reset(seed=seed + i)
        frames.append(obs)
    return np.stack(frames)


def test_loss_decreases_on_a_tiny_dataset() -> None:
    torch.manual_seed(0)
    x = frames_to_tensor(_reach_frames(32))
    model = ConvVAE(image_size=16, latent_dim=4, widths=(8, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        terms = vae_loss(model(x), x)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
        losses.append(terms.loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def _tiny_cfg(channels: int = 3):  # type: ignore[no-untyped-def]
    return resolve_config(None, [
        "env.image_size=16", f"env.grayscale={channels == 1}", "vae.widths=[8, 16]",
        "vae.latent_dim=4",
    ])


def test_encode_decode_round_trip_shapes_and_dtypes() -> None:
    cfg = _tiny_cfg()
    vae = LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)
    assert not vae.model.training
    frames = _reach_frames(5)
    z = vae.encode(frames, batch_size=2)
    assert z.shape == (5, 4) and z.dtype == np.float32
    np.testing.assert_allclose(z, vae.encode(torch.from_numpy(frames)), atol=1e-6)
    np.testing.assert_allclose(z[3:], vae.encode(frames[3:]), atol=1e-6)  # batching is invisible
    images = vae.decode(z)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(vae.reconstruct(frames), images)
    torch.manual_seed(0)
    sampled = vae.encode(frames, mode="sample")
    assert sampled.shape == (5, 4) and not np.allclose(sampled, z)


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((2, 16, 16, 1), np.uint8, r"expects \(N, 16, 16, 3\)"),
        ((2, 32, 32, 3), np.uint8, "env.image_size=16"),
        ((16, 16, 3), np.uint8, r"frames\[None\]"),
        ((2, 3, 16, 16), np.uint8, "do not fit"),
        ((2, 16, 16, 3), np.float32, "uint8"),
    ],
)
def test_encode_rejects_mismatched_frames_in_one_line(
    shape: tuple[int, ...], dtype: type, match: str
) -> None:
    cfg = _tiny_cfg()
    vae = LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)
    with pytest.raises(UserError, match=match) as info:
        vae.encode(np.zeros(shape, dtype))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="expects"):
        vae.decode(np.zeros((2, 5), np.float32))


def test_save_and_load_gives_identical_outputs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _tiny_cfg(channels=1)
    torch.manual_seed(1)
    model = build_vae(cfg.vae, cfg.env)
    cfg.save(tmp_path / "config.yaml")
    save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "step": 3})
    loaded = load_vae(tmp_path)
    before = LoadedVAE(model, cfg)
    frames = _reach_frames(6)[..., :1]
    np.testing.assert_array_equal(loaded.encode(frames), before.encode(frames))
    np.testing.assert_array_equal(loaded.reconstruct(frames), before.reconstruct(frames))
    assert loaded.weights_hash == before.weights_hash and len(loaded.weights_hash) == 64
    assert loaded.run_dir == tmp_path and loaded.image_shape == (16, 16, 1)
    with pytest.raises(UserError, match=r"no last\.pt"):
        load_vae(tmp_path, "last")
    with pytest.raises(UserError, match="not found"):
        load_vae(tmp_path / "missing")
    (tmp_path / "best.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_vae(tmp_path)


def test_weights_hash_changes_with_the_weights() -> None:
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    a = LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)
    torch.manual_seed(0)
    b = LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)
    torch.manual_seed(1)
    c = LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)
    assert a.weights_hash == b.weights_hash != c.weights_hash


def test_weights_hash_is_computed_on_first_use_only(
    monkeypatch: pytest.MonkeyPatch, tiny_config: Callable[..., Config]
) -> None:
    from worldmodel import vae as vae_module

    calls: list[int] = []
    real = vae_module.state_dict_hash

    def counted(model: torch.nn.Module) -> str:
        calls.append(1)
        return real(model)

    monkeypatch.setattr(vae_module, "state_dict_hash", counted)
    cfg = tiny_config("vae.widths=[4]", "vae.latent_dim=2")
    model = build_vae(cfg.vae, cfg.env)
    loaded = LoadedVAE(model, cfg)
    loaded.encode(np.zeros((1, 16, 16, 3), np.uint8))
    assert calls == []  # building one (every validation does) hashes nothing
    assert loaded.weights_hash == loaded.weights_hash == real(model)
    assert calls == [1]
