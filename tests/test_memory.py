"""The memory model M and ``worldmodel train-memory``: API, loss, temperature, cache, resume."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from worldmodel import train_memory
from worldmodel.cli import main as cli_main
from worldmodel.config import Config, resolve_config
from worldmodel.errors import UserError
from worldmodel.io import read_json, read_jsonl
from worldmodel.memory import LoadedMemory, MemoryOutput, build_memory, load_memory, mdn_loss
from worldmodel.vae import load_checkpoint

TINY = [
    "env.image_size=16", "vae.widths=[8, 16]", "vae.latent_dim=4",
    "memory.hidden_size=16", "memory.mixtures=2", "memory.batch_size=2", "memory.seq_len=8",
    "memory.steps=12", "memory.val_every=4", "memory.log_every=2", "memory.lr=3e-3",
    "data.val_fraction=0.25", "memory.device=cpu",
]


def _cfg(*extra: str) -> Config:
    return resolve_config(None, [*TINY, *extra])


@pytest.fixture(scope="module")
def vae(reach16_vae: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny VAE (train-memory writes its latent cache into it)."""
    return Path(shutil.copytree(reach16_vae, tmp_path_factory.mktemp("memory") / "vae"))


@pytest.fixture(scope="module")
def trained(reach16: Path, vae: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_memory.run(_cfg(), reach16, vae, tmp_path_factory.mktemp("memory") / "run")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return dict(load_checkpoint(run / "last.pt")["model"])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_memory_api_shapes_and_dtypes(trained: Path) -> None:
    mem = load_memory(trained, "best")
    assert load_memory(trained, "last").latent_dim == mem.latent_dim == 4
    assert mem.action_dim == 5 and mem.mixtures == 2  # Reach's Discrete(5), one-hot
    h, c = mem.initial_state(3)
    assert h.shape == c.shape == (1, 3, 16) and h.dtype == torch.float32
    a = torch.as_tensor(mem.actions(np.array([0, 3, 4])))
    assert a.shape == (3, 5) and a.dtype == torch.float32 and a.sum(1).tolist() == [1, 1, 1]
    pred, (h2, c2) = mem.step(torch.zeros(3, 4), a, (h, c))
    assert pred.logits.shape == pred.mu.shape == pred.logsigma.shape == (3, 4, 2)
    assert pred.reward.shape == pred.done.shape == (3,) and pred.mu.dtype == torch.float32
    assert ((pred.done_prob >= 0) & (pred.done_prob <= 1)).all()
    assert h2.shape == c2.shape == (1, 3, 16)
    z = mem.sample(pred, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 4) and z.dtype == torch.float32
    with pytest.raises(UserError, match=r"expects \(B, 4\)"):
        mem.step(torch.zeros(3, 5), a, (h, c))
    with pytest.raises(UserError, match="one-hot"):
        mem.step(torch.zeros(3, 4), torch.zeros(3, 2), (h, c))


def test_mdn_loss_equals_the_direct_log_density() -> None:
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 4, 3)  # (B, L, Z, K)
    out = MemoryOutput(torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                       0.3 * torch.randn(shape, generator=g), torch.zeros(2, 3), torch.zeros(2, 3))
    target = torch.randn(2, 3, 4, generator=g)
    pi = torch.softmax(out.logits, -1).double()
    sigma = out.logsigma.double().exp()
    x = target.double()[..., None]
    density = (pi * torch.exp(-0.5 * ((x - out.mu.double()) / sigma) ** 2)
               / (sigma * math.sqrt(2 * math.pi))).sum(-1)
    nll = -torch.log(density)  # (B, L, Z)
    assert mdn_loss(out, target).item() == pytest.approx(nll.mean().item(), rel=1e-5)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    want = nll.mean(-1)[mask].mean().item()
    assert mdn_loss(out, target, mask).item() == pytest.approx(want, rel=1e-5)
    # far from every Gaussian: finite (logsumexp), where the direct density underflows to 0
    assert math.isfinite(mdn_loss(out, target + 1e4).item())


def test_a_small_temperature_concentrates_the_samples() -> None:
    cfg = resolve_config(None, ["memory.hidden_size=4", "memory.mixtures=2"])
    mem = LoadedMemory(build_memory(cfg.memory, 1, 1), cfg, {"type": "Box", "shape": [1]})
    n = 4000
    pred = MemoryOutput(
        logits=torch.tensor([0.5, 0.0]).expand(n, 1, 2),  # component 0 a little likelier
        mu=torch.tensor([-3.0, 3.0]).expand(n, 1, 2),
        logsigma=torch.zeros(n, 1, 2), reward=torch.zeros(n), done=torch.zeros(n),
    )
    g = torch.Generator().manual_seed(0)
    hot = mem.sample(pred, tau=1.0, generator=g)[:, 0]
    cold = mem.sample(pred, tau=0.01, generator=g)[:, 0]
    assert 0.25 < (hot > 0).float().mean() < 0.5  # both components, ~38% the second
    assert (cold < 0).all()  # logits / tau: always the likelier component
    assert cold.std() == pytest.approx(0.1, rel=0.1)  # sigma * sqrt(tau)
    assert (cold + 3).abs().max() < 0.6
    with pytest.raises(UserError, match="temperature must be > 0"):
        mem.sample(pred, tau=0.0)


def test_open_loop_k1_is_the_teacher_forced_mixture_mean(reach16: Path, vae: Path,
                                                        trained: Path) -> None:
    """One open-loop step from the real history is M's teacher-forced prediction."""
    from worldmodel.dataset import open_dataset
    from worldmodel.loaders import split_episodes
    from worldmodel.memory import mixture_mean
    from worldmodel.vae import load_vae

    mem, reader = load_memory(trained, "last"), open_dataset(reach16)
    mu, logvar, _ = train_memory.cached_latents(load_vae(vae), reader)
    episodes = train_memory.load_episodes(reader, mu, logvar, reader.manifest["action_space"])
    ids = reader.episode_ids
    train_ids, val_ids = split_episodes(ids, 0.25, 0)
    val = episodes.select([ids.index(i) for i in val_ids])
    linear = train_memory.fit_linear(episodes.select([ids.index(i) for i in train_ids]))
    metrics = train_memory.evaluate(mem.model, val, linear, mem.config, torch.device("cpu"))
    assert metrics["val/latent_mse_k1"] == read_json(trained / "summary.json")[
        "open_loop_mse"]["1"]["memory"]
    with torch.no_grad():
        errors = []
        for s, n in zip(val.starts, val.lengths, strict=True):
            out, _ = mem.model(torch.from_numpy(val.mu[None, s : s + n]),
                               torch.from_numpy(val.action[None, s : s + n]))
            pred = mixture_mean(out)[0, :-1]
            errors.append((pred - torch.from_numpy(val.mu[s + 1 : s + n])).square().mean(-1))
    assert metrics["val/latent_mse_k1"] == pytest.approx(torch.cat(errors).mean().item(),
                                                         rel=1e-4)
    copy = np.concatenate([np.square(val.mu[s + 1 : s + n] - val.mu[s : s + n - 1]).mean(-1)
                           for s, n in zip(val.starts, val.lengths, strict=True)])
    assert metrics["val/copy_mse_k1"] == pytest.approx(copy.mean(), rel=1e-4)


def test_train_memory_writes_its_run_and_held_out_metrics(trained: Path, vae: Path) -> None:
    run = read_json(trained / "run.json")
    assert run["kind"] == "memory" and run["status"] == "done"
    summary = read_json(trained / "summary.json")
    assert summary["steps"] == 12
    for k in ("1", "5", "15"):
        assert set(summary["open_loop_mse"][k]) == {"memory", "copy_last_z", "linear"}
    assert summary["open_loop_mse"]["1"]["memory"] > 0
    assert Path(summary["inputs"]["latent_cache"]).is_relative_to(vae / "latents")
    assert {"precision", "recall", "terminal_steps"} <= set(summary["done"])
    val = [r for r in read_jsonl(trained / "metrics.jsonl") if "val/nll" in r]
    assert [r["step"] for r in val] == [4, 8, 12]
    assert {"val/latent_mse_k15", "val/copy_mse_k5", "val/linear_mse_k1", "val/reward_r2",
            "val/done_recall"} <= set(val[0])


def test_the_latent_cache_is_built_once_and_keyed_by_the_vae_weights(
    reach16: Path, vae: Path, trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    make_tiny_vae: Callable[..., Path],
) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("encoded the dataset again")

    with monkeypatch.context() as m:
        m.setattr(train_memory, "encode_dataset", refuse)
        train_memory.run(_cfg("memory.steps=2", "seed=1"), reach16,
                         vae, tmp_path / "again")
    caches = sorted((vae / "latents").rglob("*.npz"))
    assert len(caches) == 1

    # other weights: a new cache; a file whose recorded hash differs is not trusted
    other = make_tiny_vae(tmp_path / "other_vae", None)
    calls = []
    real = train_memory.encode_dataset

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(train_memory, "encode_dataset", counting)
    out = train_memory.run(_cfg("memory.steps=2"), reach16, other, tmp_path / "other")
    assert len(calls) == 1
    cache = Path(read_json(out / "summary.json")["inputs"]["latent_cache"])
    assert cache.is_relative_to(other / "latents") and cache.is_file()
    with np.load(cache) as f:
        parts = {k: f[k] for k in f.files}
    parts["weights_hash"] = np.array("0" * 64)
    np.savez(cache.with_suffix(""), **parts)  # (np.savez adds the .npz)
    train_memory.run(_cfg("memory.steps=2"), reach16, other, tmp_path / "other2")
    assert len(calls) == 2
    train_memory.run(_cfg("memory.steps=2"), reach16, other, tmp_path / "other3")
    assert len(calls) == 2


def test_resume_gives_the_same_result_as_an_uninterrupted_run(
    reach16: Path, vae: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg("memory.steps=10")  # 2 batches per epoch: resumed mid-epoch
    whole = train_memory.run(cfg, reach16, vae, tmp_path / "whole")
    real_stream = train_memory.batch_stream

    def interrupted(dataset: Any, step: int) -> Iterator[Any]:
        for i, batch in enumerate(real_stream(dataset, step)):
            if step + i == 6:  # killed during step 7; last.pt is from step 4
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(train_memory, "batch_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_memory.run(cfg, reach16, vae, tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 4
    monkeypatch.setattr(train_memory, "batch_stream", real_stream)

    resumed = train_memory.run(cfg, reach16, vae, tmp_path / "cut", resume=True)
    assert _same(_weights(whole), _weights(resumed))
    steps = [r["step"] for r in read_jsonl(resumed / "metrics.jsonl") if "memory/nll" in r]
    assert steps == [2, 4, 6, 8, 10]
    assert read_json(whole / "summary.json")["val_nll"] == read_json(
        resumed / "summary.json")["val_nll"]
    # extending a finished run continues; other output settings are refused
    train_memory.run(_cfg("memory.steps=12"), reach16, vae, tmp_path / "cut", resume=True)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 12
    with pytest.raises(UserError, match=r"differ from .*: memory.hidden_size: 16 -> 8;"):
        train_memory.run(_cfg("memory.steps=14", "memory.hidden_size=8"), reach16, vae,
                         tmp_path / "cut", resume=True)
    # the dream's temperature is not a training setting
    train_memory.run(_cfg("memory.steps=14", "memory.temperature=0.5"), reach16, vae,
                     tmp_path / "cut", resume=True)


def _one_line(e: pytest.ExceptionInfo[UserError]) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_bad_inputs_are_one_line_errors(
    reach16: Path, vae: Path, trained: Path, tmp_path: Path, make_tiny_vae: Callable[..., Path]
) -> None:
    no_actions = Path(shutil.copytree(reach16, tmp_path / "no_actions"))
    manifest = json.loads((no_actions / "manifest.json").read_text())
    del manifest["action_space"]
    (no_actions / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as e:
        train_memory.run(_cfg(), no_actions, vae, tmp_path / "a")
    assert "no action space" in _one_line(e)

    no_rewards = Path(shutil.copytree(reach16, tmp_path / "no_rewards"))
    for shard in (no_rewards / "shards").glob("*.zarr"):
        shutil.rmtree(shard / "reward")
    with pytest.raises(UserError) as e:
        train_memory.run(_cfg(), no_rewards, vae, tmp_path / "b")
    assert "no readable rewards" in _one_line(e)

    big = make_tiny_vae(tmp_path / "vae32", None, "env.image_size=32")
    with pytest.raises(UserError) as e:
        train_memory.run(_cfg(), reach16, big, tmp_path / "c")
    assert "encodes 32x32x3 frames but dataset" in _one_line(e)

    with pytest.raises(UserError) as e:
        train_memory.run(_cfg(), reach16, trained, tmp_path / "d")
    assert "is a memory run; pass a vae run folder" in _one_line(e)
    with pytest.raises(UserError) as e:
        train_memory.run(_cfg(), reach16, vae, vae)
    assert "holds a vae run, not a memory run" in _one_line(e)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_on_reach_m_learns(reach16: Path, vae: Path, tmp_path: Path) -> None:
    """A short real training: the held-out NLL falls well below the untrained M's.

    (M's one-step latent MSE does not beat copy-last-z on this tiny Reach: the tiny VAE's
    posterior noise, sigma ~0.2-0.6, dwarfs a step's change of mu, ~0.01, and M is trained on
    sampled z as in World Models; see the report in summary.json.)
    """
    out = train_memory.run(_cfg("memory.steps=200", "memory.val_every=100", "memory.batch_size=8",
                                "memory.seq_len=32"), reach16, vae, tmp_path / "run")
    val = [r for r in read_jsonl(out / "metrics.jsonl") if "val/nll" in r]
    untrained = train_memory.run(_cfg("memory.steps=1", "memory.lr=1e-9"), reach16, vae,
                                 tmp_path / "untrained")
    before = read_json(untrained / "summary.json")["val_nll"]
    assert val[-1]["val/nll"] < before - 0.5
    summary = read_json(out / "summary.json")
    k1 = summary["open_loop_mse"]["1"]
    assert k1["memory"] < read_json(untrained / "summary.json")["open_loop_mse"]["1"]["memory"]
    print("reach:", summary["val_nll"], "before", before, summary["open_loop_mse"],
          summary["reward_r2"], summary["done"])


def test_the_reward_head_is_standardised_robustly_and_saved(trained: Path) -> None:
    """The head predicts ``(r - median) / (1.4826 MAD)``: rare bonuses do not set the scale."""
    m = build_memory(_cfg().memory, latent_dim=4, action_dim=5)
    dense = np.random.default_rng(0).normal(-0.03, 0.01, 1000).astype(np.float32)
    reward = np.concatenate([dense, np.ones(10, np.float32)])  # 1% of +1 bonuses
    episodes = train_memory.Episodes(*(np.zeros((len(reward), 1), np.float32),) * 3, reward,
                                     np.zeros(len(reward), bool), np.zeros(1, np.int64),
                                     np.array([len(reward)]))
    train_memory.standardize_reward(m, episodes)
    assert float(m.reward_mean) == pytest.approx(float(np.median(reward)))
    assert float(m.reward_std) == pytest.approx(0.01, rel=0.15)  # reward.std() is ~0.1
    # CarRacing: -0.2 (two frames of -0.1, float32 round-off apart) on most steps, a new tile
    # (+3.1) on a tenth: the MAD is ~1e-7, so the std sets the scale
    rng = np.random.default_rng(1)
    idle = (np.float32(-0.1) + rng.choice([-0.1, -0.1000001], 900).astype(np.float32))
    tiles = np.concatenate([idle, np.full(100, 3.1, np.float32)])
    train_memory.standardize_reward(m, episodes._replace(reward=tiles))
    assert float(m.reward_std) == pytest.approx(float(tiles.astype(np.float64).std()), rel=1e-5)
    train_memory.standardize_reward(m, episodes)
    out, _ = m(torch.zeros(1, 2, 4), torch.zeros(1, 2, 5))
    raw = m.reward(m.lstm(torch.zeros(1, 2, 9))[0]).squeeze(-1)
    torch.testing.assert_close(out.reward, raw * m.reward_std + m.reward_mean)
    # saved with the weights; a checkpoint without them (an older run) loads with scale 1
    saved = load_memory(trained).model
    assert float(saved.reward_std) != 1.0 and "reward_std" in _weights(trained)
    old = trained.parent / "old"
    shutil.copytree(trained, old)
    state = load_checkpoint(old / "best.pt")
    for key in ("reward_mean", "reward_std"):
        del state["model"][key]
    torch.save(state, old / "best.pt")
    assert float(load_memory(old).model.reward_std) == 1.0


def test_cli_train_memory(reach16: Path, vae: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    sets = [a for s in [*TINY, "memory.steps=2"] for a in ("--set", s)]
    out = tmp_path / "run"
    assert cli_main(["-q", "train-memory", *sets, "-d", str(reach16), "--vae", str(vae),
                     "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert cli_main(["-q", "train-memory", *sets, "-d", str(reach16), "--vae",
                     str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
