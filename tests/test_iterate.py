"""``train-memory`` on several datasets, and ``worldmodel iterate`` (World Models' rounds)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY_MEMORY

from agents import iterate
from agents import train as agent_train
from worldmodel import train_memory
from worldmodel.cli import main
from worldmodel.config import Config
from worldmodel.dataset import open_dataset
from worldmodel.errors import UserError
from worldmodel.io import read_json

AGENT = [
    "env.n_envs=2", "env.max_episode_steps=12", "agent.timesteps=64", "agent.eval_every=64",
    "agent.eval_episodes=2", "agent.checkpoint_every=64", "agent.device=cpu",
    "agent.hyperparams={n_steps: 32, batch_size: 32, n_epochs: 1}", "agent.obs_mode=dream",
    "collect.workers=1", "iterate.episodes=2", "iterate.epsilon=0.5", "iterate.rounds=1",
]


def _collect(tmp: Path, tiny_config: Callable[..., Config], *overrides: str) -> Path:
    from worldmodel.collect import run

    cfg = tiny_config("collect.workers=1", "collect.max_episode_steps=12", *overrides)
    return run(cfg, tmp / "data")


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory, tiny_config: Callable[..., Config]) -> Path:
    """3 more Reach episodes at 16x16x3 (another seed)."""
    return _collect(tmp_path_factory.mktemp("second"), tiny_config, "seed=7",
                    "collect.episodes=3")


def _memory_cfg(tiny_config: Callable[..., Config], *extra: str) -> Config:
    return tiny_config(*TINY_MEMORY, *extra)


def _weights_mtime(run: Path) -> float:
    return (run / "last.pt").stat().st_mtime if (run / "last.pt").exists() else (
        run / "last.zip").stat().st_mtime


def test_memory_on_two_datasets_records_both_and_their_frames(
    reach16: Path, second: Path, reach16_memory: tuple[Path, Path], tmp_path: Path,
    tiny_config: Callable[..., Config],
) -> None:
    vae = reach16_memory[0]
    out = train_memory.run(_memory_cfg(tiny_config), [reach16, second], vae, tmp_path / "m")
    inputs = read_json(out / "summary.json")["inputs"]
    frames = [open_dataset(d).num_frames for d in (reach16, second)]
    assert inputs["dataset"] == str(reach16)  # the dream's start frames
    assert inputs["datasets"] == [str(reach16), str(second)]
    assert inputs["dataset_frames"] == frames
    assert inputs["real_env_steps_collected"] == sum(frames)
    assert len(set(inputs["latent_caches"])) == 2  # one cache per (dataset, VAE weights)
    assert all(Path(c).is_file() for c in inputs["latent_caches"])
    # a validation episode from each dataset (data.val_fraction 0.25 of 4 and of 3 episodes)
    assert inputs["val_episodes"] == 2
    assert inputs["train_episodes"] == 3 + 2
    assert agent_train.collected_frames(out) == sum(frames)

    # resume: the same list continues; another list (fewer, reordered) is refused in one line
    more = _memory_cfg(tiny_config, "memory.steps=6")
    for datasets in ([reach16], [second, reach16]):
        with pytest.raises(UserError, match=r"trained on 2 dataset\(s\)") as e:
            train_memory.run(more, datasets, vae, out, resume=True)
        assert "\n" not in str(e.value)
    train_memory.run(more, [reach16, second], vae, out, resume=True)
    assert read_json(out / "summary.json")["steps"] == 6

    # a single dataset keeps its former summary
    one = train_memory.run(_memory_cfg(tiny_config), reach16, vae, tmp_path / "one")
    single = read_json(one / "summary.json")["inputs"]
    assert single["datasets"] == [str(reach16)] == [single["dataset"]]
    assert single["real_env_steps_collected"] == frames[0]


def test_datasets_of_other_frames_or_passed_twice_are_refused(
    reach16: Path, reach16_memory: tuple[Path, Path], tmp_path: Path,
    tiny_config: Callable[..., Config],
) -> None:
    gray = _collect(tmp_path / "gray", tiny_config, "env.grayscale=true", "collect.episodes=1",
                    "collect.max_episode_steps=3")
    cfg = _memory_cfg(tiny_config)
    with pytest.raises(UserError, match=r"holds 16x16x1 frames but dataset .* holds 16x16x3") as e:
        train_memory.run(cfg, [reach16, gray], reach16_memory[0], tmp_path / "m")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="passed twice"):
        train_memory.run(cfg, [reach16, reach16], reach16_memory[0], tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def initial_agent(reach16_memory: tuple[Path, Path],
                  tmp_path_factory: pytest.TempPathFactory,
                  tiny_config: Callable[..., Config]) -> Path:
    """A dream agent of 64 steps in the session's tiny M: round 0."""
    vae, memory = reach16_memory
    return agent_train.run(tiny_config(*TINY_MEMORY, *AGENT),
                           tmp_path_factory.mktemp("agent0") / "agent", vae=vae, memory=memory)


@pytest.mark.slow
def test_one_round_counts_every_real_frame_and_a_rerun_redoes_nothing(
    reach16: Path, reach16_memory: tuple[Path, Path], initial_agent: Path, tmp_path: Path,
    tiny_config: Callable[..., Config],
) -> None:
    vae, memory = reach16_memory
    cfg = tiny_config(*TINY_MEMORY, *AGENT)
    out = iterate.run(cfg, reach16, vae, memory, initial_agent, tmp_path / "it")
    summary = read_json(out / "summary.json")
    assert read_json(out / "run.json")["status"] == "done"
    r0, r1 = summary["rounds"]
    data1 = out / "round-1" / "data"
    manifest = read_json(data1 / "manifest.json")
    # round 1 collected with the initial agent and exploration noise, iterate.episodes episodes
    assert manifest["policy"] == f"agent:{initial_agent.resolve()}"
    assert manifest["config"]["collect"]["epsilon"] == 0.5
    assert len(open_dataset(data1).episode_ids) == 2
    frames0 = open_dataset(reach16).num_frames
    frames1 = open_dataset(data1).num_frames
    assert frames1 == sum(r["frames"] for r in manifest["runs"])
    assert (r0["real_frames"], r0["real_env_steps"]) == (frames0, frames0)
    assert (r1["real_frames"], r1["real_env_steps"]) == (frames1, frames0 + frames1)
    assert summary["real_env_steps"] == frames0 + frames1
    # M of round 1 trained on both; its dream agent counts the same real steps (compare reads it)
    m1 = read_json(out / "round-1" / "memory" / "summary.json")["inputs"]
    assert m1["datasets"] == [str(reach16), str(data1)]
    agent1 = read_json(out / "round-1" / "agent" / "summary.json")
    assert agent1["obs_mode"] == "dream" and agent1["real_env_steps"] == 0
    assert agent1["real_env_steps_collected"] == frames0 + frames1
    assert r1["agent"]["mean_return"] == agent1["final_eval"]["mean_return"]
    assert r1["agent"]["eval_env_steps"] > 0
    assert r1["memory"]["val_nll"] is not None and "1" in r1["memory"]["open_loop_mse"]

    # a rerun (through the CLI) finds every sub-run finished and redoes nothing
    runs = [out / "round-1" / "memory", out / "round-1" / "agent"]
    before = [_weights_mtime(r) for r in runs]
    cfg.save(tmp_path / "cfg.yaml")
    args = ["iterate", "-c", str(tmp_path / "cfg.yaml"), "-d", str(reach16), "--vae", str(vae),
            "--memory", str(memory), "--agent", str(initial_agent), "-o", str(out),
            "--rounds", "1"]
    assert main(args) == 0
    assert [_weights_mtime(r) for r in runs] == before
    assert read_json(out / "summary.json")["rounds"] == summary["rounds"]
    # an interrupted round resumes where it stopped: only the lost agent is trained again
    import shutil

    shutil.rmtree(out / "round-1" / "agent")
    iterate.run(cfg, reach16, vae, memory, initial_agent, out)
    assert _weights_mtime(runs[0]) == before[0]
    assert (out / "round-1" / "agent" / "summary.json").is_file()
    # other settings or inputs are refused
    with pytest.raises(UserError, match=r"iterate\.epsilon: 0\.5 -> 0\.25"):
        iterate.run(tiny_config(*TINY_MEMORY, *AGENT, "iterate.epsilon=0.25"), reach16, vae,
                    memory, initial_agent, out)
    with pytest.raises(UserError, match="other inputs"):
        iterate.run(cfg, reach16, vae, memory, out / "round-1" / "agent", out)
    assert read_json(out / "run.json")["status"] == "done"  # a refused rerun leaves it alone
    # more rounds extend the run: round 2 collects with round 1's agent, M reads all three
    iterate.run(cfg, reach16, vae, memory, initial_agent, out, rounds=2)
    r2 = read_json(out / "summary.json")["rounds"][2]
    data2 = out / "round-2" / "data"
    assert read_json(data2 / "manifest.json")["policy"] == (
        f"agent:{(out / 'round-1' / 'agent').resolve()}")
    assert r2["real_env_steps"] == frames0 + frames1 + open_dataset(data2).num_frames
    assert r2["agent"]["real_env_steps_collected"] == r2["real_env_steps"]
    assert read_json(out / "round-2" / "memory" / "summary.json")["inputs"]["datasets"] == [
        str(reach16), str(data1), str(data2)]
