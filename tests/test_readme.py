from __future__ import annotations

import re
from pathlib import Path

import pytest

from worldmodel.config import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", re.S)


def test_readme_config_reference_is_current() -> None:
    match = BLOCK.search(README.read_text())
    assert match, "README.md lost its config-reference markers"
    assert match.group(1) == config_reference(), (
        "README config reference is stale: regenerate it with `python tests/test_readme.py`"
    )


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block


def regenerate() -> None:
    text = README.read_text()
    new = BLOCK.sub(
        lambda _: f"<!-- config-reference:start -->\n{config_reference()}"
        "<!-- config-reference:end -->",
        text,
    )
    README.write_text(new)


if __name__ == "__main__":
    regenerate()


def test_the_python_example_runs(
    reach16: Path, reach16_vae: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's "Use it from Python" block, on the session's tiny VAE and a tiny M."""
    import shutil

    from worldmodel import train_memory
    from worldmodel.config import resolve_config

    block = re.search(r"<!-- python-example:start -->\n```python\n(.*?)```", README.read_text(),
                      re.S)
    assert block, "README.md lost its python-example markers"
    vae = Path(shutil.copytree(reach16_vae, tmp_path / "vae"))  # M caches latents in it
    cfg = resolve_config(None, [
        "env.image_size=16", "memory.hidden_size=8", "memory.mixtures=2",
        "memory.batch_size=2", "memory.seq_len=8", "memory.steps=4", "memory.val_every=4",
        "data.val_fraction=0.25"])
    memory = train_memory.run(cfg, reach16, vae, tmp_path / "memory")
    code = (block.group(1).replace('"runs/quickstart/vae"', repr(str(vae)))
            .replace('"runs/memory"', repr(str(memory))).replace("learn(2_048)", "learn(64)")
            .replace('PPO("MlpPolicy", env, seed=0)',
                     'PPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0)'))
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert tuple(scope["z_next"].shape) == tuple(scope["z"].shape)  # type: ignore[attr-defined]
