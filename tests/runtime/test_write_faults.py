"""Output-writing faults (issue 12): a full disk, a read-only folder, two writers of one output, file modes, links,
temporary names and the sweep of temporaries that killed runs left behind.

Every test asserts the msfm error (type and a distinctive part of the message) and that nothing already on disk was
lost: previous outputs byte-for-byte, no debris files.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

import msfm
from cli_runner import run_cli
from msfm.errors import OutputError
from msfm.runtime import atomic
from msfm.runtime.atomic import (
    atomic_dir,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    check_output_free,
    sweep_stale,
)
from msfm.runtime.h5ad import check_output, open_hdf5, write_h5ad_atomic, write_output
from msfm.runtime.h5ad_stream import H5adResultWriter
from sf_official import official_cells_h5ad

FIX = Path(__file__).parents[1] / "fixtures" / "scfoundation"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
LINUX_FDS = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")


run = run_cli


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _adata(n: int = 3) -> ad.AnnData:
    a = ad.AnnData(X=np.arange(n * 2, dtype=np.float32).reshape(n, 2))
    a.obs_names = [f"c{i}" for i in range(n)]
    return a


@pytest.fixture(scope="module")
def cells_h5ad(tmp_path_factory) -> Path:
    return official_cells_h5ad(tmp_path_factory.mktemp("cells"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "sf_gene"
    assert run("scfoundation", "convert", FIX / "tiny_official.ckpt", "--variant", "gene", "--out", out) == 0
    return out


def _fail_temp_writes(monkeypatch: pytest.MonkeyPatch, limit: int, code: int = errno.ENOSPC) -> None:
    """Writes (and kernel copies) into msfm temporaries fail with ``code`` past ``limit`` bytes, as on a full disk."""
    real_write, real_sendfile = os.write, os.sendfile

    def is_temp(fd: int) -> bool:
        try:
            return ".msfm-" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False

    def write(fd: int, data) -> int:
        if is_temp(fd) and os.lseek(fd, 0, os.SEEK_CUR) + memoryview(data).nbytes > limit:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    def sendfile(out_fd: int, in_fd: int, offset, count: int) -> int:
        if is_temp(out_fd) and os.lseek(out_fd, 0, os.SEEK_CUR) + count > limit:
            raise OSError(code, os.strerror(code))
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "sendfile", sendfile)


# -- 1. a full disk --------------------------------------------------------------------------------------------
_DISK_FULL_SCRIPT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like ENOSPC
from msfm.cli import main
import msfm.models.scfoundation, msfm.runtime.h5ad_stream  # imported (and compiled) before the limit
codes = []
for limit, args in zip(map(int, sys.argv[1].split(",")), sys.argv[2:]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        main(args.split("|"))
        codes.append(0)
    except SystemExit as exc:
        codes.append(int(exc.code or 0))
print("CODES", codes)
"""


@pytest.mark.skipif(not hasattr(os, "sendfile") or os.name != "posix", reason="RLIMIT_FSIZE needs POSIX")
def test_disk_full_while_streaming_embed_and_gene_embed_exits_2_without_debris(ckpt, cells_h5ad, tmp_path):
    """The reported crash: HDF5 met a failed write and the process died with SIGSEGV (rc 139), leaving a temp."""
    out = tmp_path / "out"
    out.mkdir()
    emb, genes = out / "emb.h5ad", out / "genes.h5"
    emb.write_bytes(b"previous embedding output")  # must survive the failed --overwrite runs byte-for-byte
    size = cells_h5ad.stat().st_size
    common = f"-c|{ckpt}|--device|cpu|--quiet|--no-aliases|--overwrite"
    runs = [
        # the copy of the input fits, the results do not (the copy itself failing is tested in-process below)
        (size + 4096, f"scfoundation|embed|{cells_h5ad}|-o|{emb}|{common}"),
        (4096, f"scfoundation|gene-embed|{cells_h5ad}|-o|{genes}|{common}|--genes|CD3E,CD19,MS4A1"),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_SCRIPT, ",".join(str(n) for n, _ in runs), *(a for _, a in runs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # no segmentation fault (-11)
    assert "CODES [2, 2]" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: Cannot write")]
    assert len(errors) == 2, proc.stderr[-3000:]
    for line in errors:
        assert re.search(r"file-size limit.*bytes\) free in .*Free some space", line), line
    assert f"Cannot write {emb}: " in errors[0]
    assert "the previous emb.h5ad is unchanged" in errors[0]
    assert f"Cannot write {genes}: " in errors[1]
    assert "no partial file was left" in errors[1]
    assert "Traceback" not in proc.stderr
    assert emb.read_bytes() == b"previous embedding output"
    assert sorted(p.name for p in out.iterdir()) == ["emb.h5ad"]  # no temporary left, no gene file


@LINUX_FDS
def test_streamed_writer_full_disk_mid_stream_is_output_error(tmp_path, monkeypatch):
    src, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    _adata(4000).write_h5ad(src)
    out.write_bytes(b"old")
    _fail_temp_writes(monkeypatch, src.stat().st_size + 50_000)
    writer = H5adResultWriter(src, out)  # the copy fits
    ds = writer.create_obsm("X_k", 64)
    with pytest.raises(OutputError, match=r"the disk is full \(.*ENOSPC\); .*bytes\) free in") as info:  # noqa: PT012
        for start in range(0, 4000, 500):
            rows = np.arange(start, start + 500)
            writer.write_rows(ds, rows, np.ones((500, 64), np.float32))
    assert f"Cannot write {out}: " in str(info.value)
    assert "the previous out.h5ad is unchanged" in str(info.value)
    writer.close()  # a second close is harmless
    assert out.read_bytes() == b"old"
    assert _hidden(tmp_path) == []


@LINUX_FDS
def test_streamed_writer_full_disk_while_copying_the_input(tmp_path, monkeypatch):
    src, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    _adata(4000).write_h5ad(src)
    _fail_temp_writes(monkeypatch, src.stat().st_size // 2, errno.EDQUOT)
    with pytest.raises(
        OutputError, match=r"the disk quota is used up \(.*EDQUOT\).*no partial file was left"
    ):
        H5adResultWriter(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


@LINUX_FDS
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_write_output_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, code):
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"previous")
    _fail_temp_writes(monkeypatch, 2000, code)
    with pytest.raises(OutputError, match=f"Cannot write {re.escape(str(out))}: .*{errno.errorcode[code]}"):
        write_output(_adata(2000), out)
    assert out.read_bytes() == b"previous"
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_atomic_writers_turn_full_disk_errors_into_output_error(tmp_path, code):
    target, folder = tmp_path / "a.bin", tmp_path / "run"
    target.write_bytes(b"keep")
    with (  # noqa: PT012
        pytest.raises(OutputError, match=r"bytes\) free in .*Nothing was written"),
        atomic_write(target) as fh,
    ):
        fh.write(b"partial")
        raise OSError(code, os.strerror(code))
    with pytest.raises(OutputError, match=r"bytes\) free in"), atomic_path(target) as tmp:  # noqa: PT012
        tmp.write_bytes(b"partial")
        raise OSError(code, os.strerror(code))
    with atomic_dir(folder) as tmp:
        (tmp / "x").write_text("v1")
    with pytest.raises(OutputError, match=r"bytes\) free in"), atomic_dir(folder) as tmp:  # noqa: PT012
        (tmp / "x").write_text("v2")
        raise OSError(code, os.strerror(code))
    assert target.read_bytes() == b"keep"
    assert (folder / "x").read_text() == "v1"
    assert _hidden(tmp_path) == []


def _tiny_disk(monkeypatch: pytest.MonkeyPatch, budget: int, folder: Path) -> None:
    """A disk of ``budget`` free bytes, less what the files under ``folder`` take."""
    usage = shutil.disk_usage("/")

    def disk_usage(_path):
        used = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        return usage._replace(free=max(0, budget - used))

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_streamed_embed_preflight_refuses_before_compute(ckpt, cells_h5ad, tmp_path, monkeypatch):
    import msfm.models.scfoundation.embedding as embedding

    def no_compute(*_a, **_k):
        raise AssertionError("compute started although the disk was too small")

    monkeypatch.setattr(embedding, "embed_source", no_compute)
    _tiny_disk(monkeypatch, cells_h5ad.stat().st_size + 10, tmp_path)  # the copy fits, the embeddings do not
    out = tmp_path / "emb.h5ad"
    with pytest.raises(
        OutputError, match=r"the results \(obsm/X_scfoundation and others\) needs about .* free"
    ):
        msfm.scfoundation.embed(cells_h5ad, ckpt, out=out, device="cpu", progress=False, use_aliases=False)
    _tiny_disk(monkeypatch, 10, tmp_path)
    with pytest.raises(OutputError, match="the copy of the input needs about"):
        msfm.scfoundation.embed(cells_h5ad, ckpt, out=out, device="cpu", progress=False, use_aliases=False)
    assert list(tmp_path.iterdir()) == []


def test_gene_embed_preflight_refuses_before_compute(ckpt, cells_h5ad, tmp_path, monkeypatch, capsys):
    import msfm.models.scfoundation.gene_context as gene_context

    monkeypatch.setattr(gene_context, "decode_batches", lambda *a, **k: pytest.fail("compute started"))
    _tiny_disk(monkeypatch, 100, tmp_path)
    out = tmp_path / "g.h5"
    code = run("scfoundation", "embed-genes", cells_h5ad, "-c", ckpt, "-o", out, "--genes", "CD3E", "--quiet")
    assert code == 2
    assert "the gene embeddings needs about" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- 2. a read-only folder -------------------------------------------------------------------------------------
def _read_only(monkeypatch: pytest.MonkeyPatch, code: int = errno.EROFS) -> None:
    def mkstemp(suffix="", prefix="tmp", dir=None, text=False):
        raise OSError(code, os.strerror(code), os.path.join(dir or ".", f"{prefix}abcdefgh{suffix}"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_check_output_probes_that_the_folder_is_writable(tmp_path, monkeypatch, code):
    _read_only(monkeypatch, code)
    with pytest.raises(
        OutputError, match=f"the folder {re.escape(str(tmp_path))} is not writable .*{errno.errorcode[code]}"
    ):
        check_output(tmp_path / "o.h5ad", overwrite=False)
    with pytest.raises(OutputError, match="is not writable"):
        check_output_free(
            tmp_path / "new" / "run", overwrite=False
        )  # missing folders: the nearest existing one
    with pytest.raises(OutputError, match=r"is not writable.*Choose another output path"):
        write_output(_adata(), tmp_path / "o.h5ad")
    assert list(tmp_path.iterdir()) == []


def test_scmulan_predict_refuses_a_read_only_folder_before_compute(cells_h5ad, tmp_path, monkeypatch, capsys):
    """Before: the raw Errno 30 came only after all the compute. The checkpoint does not even exist here: the output
    check comes first."""
    _read_only(monkeypatch)
    code = run("scmulan", "predict", cells_h5ad, "-c", tmp_path / "no_ckpt", "-o", tmp_path / "o.h5ad")
    assert code == 2
    err = capsys.readouterr().err
    assert "is not writable (Read-only file system, EROFS)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("family", "verb"),
    [
        ("scfoundation", "embed"),
        ("scfoundation", "enhance"),
        ("scfoundation", "embed_genes"),
        ("scfoundation", "predict"),
        ("scmulan", "predict"),
        ("scmulan", "embed"),
        ("scmulan", "next_state"),
        ("gest", "embed"),
        ("gest", "predict"),
    ],
)
def test_verbs_check_a_read_only_output_folder_before_loading(
    cells_h5ad, tmp_path, monkeypatch, family, verb
):
    _read_only(monkeypatch)
    fn = getattr(getattr(msfm, family), verb)
    with pytest.raises(OutputError, match="is not writable"):
        fn(cells_h5ad, tmp_path / "missing_checkpoint", out=tmp_path / "o.h5ad")


_SETUID_SCRIPT = """
import os, sys
from msfm.errors import OutputError
from msfm.runtime.h5ad import check_output
os.setgid(65534)
os.setuid(65534)
try:
    check_output(sys.argv[1], overwrite=False)
except OutputError as err:
    print("OUTPUT_ERROR", err)
else:
    print("NO_ERROR")
"""


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="dropping to another user needs root"
)
def test_read_only_folder_for_real_as_an_unprivileged_user(tmp_path):
    """Root may write a 0o555 folder (os.access says yes to root), so the real case drops to uid 65534."""
    base = Path(os.path.realpath(os.environ.get("TMPDIR", "/tmp"))) / f"msfm-ro-{os.getpid()}"
    folder = base / "ro"
    try:
        folder.mkdir(parents=True)
        os.chmod(base, 0o755)
        os.chmod(folder, 0o555)
        proc = subprocess.run(
            [sys.executable, "-c", _SETUID_SCRIPT, str(folder / "o.h5ad")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "OUTPUT_ERROR" in proc.stdout, proc.stdout + proc.stderr
        assert f"the folder {folder} is not writable (Permission denied, EACCES)" in proc.stdout
        assert list(folder.iterdir()) == []
    finally:
        os.chmod(folder, 0o755) if folder.exists() else None
        shutil.rmtree(base, ignore_errors=True)


# -- 3. two writers of one output ------------------------------------------------------------------------------
def test_output_that_appears_while_computing_is_never_replaced(tmp_path):
    target = tmp_path / "o.bin"
    with pytest.raises(OutputError, match=r"appeared while this run was computing.*Nothing was overwritten"):  # noqa: PT012
        with atomic_write(target, replace=False) as fh:
            fh.write(b"mine")
            target.write_bytes(b"theirs")  # another process finished first
    assert target.read_bytes() == b"theirs"
    with (
        pytest.raises(OutputError, match="--overwrite"),
        atomic_path(tmp_path / "o.bin", replace=False) as tmp,
    ):
        tmp.write_bytes(b"mine")
    folder = tmp_path / "run"
    with pytest.raises(OutputError, match="appeared while"), atomic_dir(folder, replace=False) as tmp:  # noqa: PT012
        (tmp / "x").write_text("mine")
        folder.mkdir()
        (folder / "x").write_text("theirs")
    assert (folder / "x").read_text() == "theirs"
    assert target.read_bytes() == b"theirs"
    assert _hidden(tmp_path) == []


def test_overwrite_means_the_last_writer_wins(tmp_path):
    target = tmp_path / "o.bin"
    with atomic_write(target, replace=True) as fh:
        fh.write(b"mine")
        target.write_bytes(b"theirs")
    assert target.read_bytes() == b"mine"
    write_output(_adata(3), tmp_path / "o.h5ad")
    write_output(_adata(5), tmp_path / "o.h5ad", replace=True)
    assert ad.read_h5ad(tmp_path / "o.h5ad").n_obs == 5
    assert _hidden(tmp_path) == []


def test_no_replace_without_hard_links_falls_back_to_a_check(tmp_path, monkeypatch):
    def no_links(*_a, **_k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    atomic_write_bytes(tmp_path / "new.bin", b"ok", replace=False)
    assert (tmp_path / "new.bin").read_bytes() == b"ok"
    with pytest.raises(OutputError, match="appeared while"):  # noqa: PT012
        with atomic_write(tmp_path / "late.bin", replace=False) as fh:
            fh.write(b"mine")
            (tmp_path / "late.bin").write_bytes(b"theirs")
    assert (tmp_path / "late.bin").read_bytes() == b"theirs"
    assert _hidden(tmp_path) == []


def test_streamed_writer_without_overwrite_refuses_an_output_that_appeared(tmp_path):
    src, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    _adata().write_h5ad(src)
    with pytest.raises(OutputError, match="appeared while this run was computing"):  # noqa: PT012
        with H5adResultWriter(src, out, overwrite=False) as w:
            w.write_rows(w.create_obsm("X_k", 2), np.arange(3), np.ones((3, 2), np.float32))
            out.write_bytes(b"theirs")
    assert out.read_bytes() == b"theirs"
    assert _hidden(tmp_path) == []


def test_embed_without_overwrite_keeps_an_output_written_meanwhile(ckpt, cells_h5ad, tmp_path, monkeypatch):
    """Both the streamed (path in, path out) and the in-memory path pass the verb's overwrite to the writer."""
    import msfm.models.scfoundation.embedding as embedding

    real = embedding.embed_source
    out = tmp_path / "emb.h5ad"

    def other_process_finishes_first(*args, **kwargs):
        out.write_bytes(b"theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(embedding, "embed_source", other_process_finishes_first)
    kw = {"device": "cpu", "progress": False, "use_aliases": False}
    with pytest.raises(OutputError, match="appeared while this run was computing"):
        msfm.scfoundation.embed(cells_h5ad, ckpt, out=out, **kw)
    assert out.read_bytes() == b"theirs"
    out.unlink()
    with pytest.raises(OutputError, match="appeared while this run was computing"):
        msfm.scfoundation.embed(ad.read_h5ad(cells_h5ad), ckpt, out=out, **kw)
    assert out.read_bytes() == b"theirs"
    assert _hidden(tmp_path) == []


def test_two_processes_writing_one_output_without_overwrite(tmp_path):
    """Real processes: both pass the check before either commits; exactly one wins, the other is refused."""
    out, gate = tmp_path / "o.h5ad", tmp_path / "gate"
    script = (
        "import sys, time, os\n"
        "from pathlib import Path\n"
        "import anndata as ad, numpy as np\n"
        "from msfm.errors import OutputError\n"
        "from msfm.runtime.h5ad import check_output, write_output\n"
        "out, gate, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]\n"
        "check_output(out, overwrite=False)\n"
        "(gate / tag).touch()\n"
        "while len(list(gate.iterdir())) < 2: time.sleep(0.01)\n"
        "a = ad.AnnData(np.zeros((2, 1), np.float32)); a.uns['by'] = tag\n"
        "try:\n"
        "    write_output(a, out, replace=False); print('WROTE')\n"
        "except OutputError as err:\n"
        "    print('REFUSED', err)\n"
    )
    gate.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(out), str(gate), tag], stdout=subprocess.PIPE, text=True
        )
        for tag in ("a", "b")
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert sorted(o.split()[0] for o in outputs) == ["REFUSED", "WROTE"], outputs
    winner = "ab"[[o.startswith("WROTE") for o in outputs].index(True)]
    assert ad.read_h5ad(out).uns["by"] == winner
    assert "appeared while this run was computing" in next(o for o in outputs if o.startswith("REFUSED"))
    assert _hidden(tmp_path) == []


# -- 4. modes and symbolic links -------------------------------------------------------------------------------
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_new_outputs_follow_the_umask_and_replaced_ones_keep_their_mode(tmp_path, umask_027):
    src = tmp_path / "in.h5ad"
    _adata().write_h5ad(src)
    streamed, written, plain, folder = (tmp_path / n for n in ("s.h5ad", "w.h5ad", "p.bin", "d"))
    with H5adResultWriter(src, streamed) as w:
        w.write_rows(w.create_obsm("X_k", 2), np.arange(3), np.ones((3, 2), np.float32))
    write_h5ad_atomic(_adata(), written)
    atomic_write_bytes(plain, b"x")
    with atomic_dir(folder) as tmp:
        (tmp / "f").write_text("x")
    assert [_mode(p) for p in (streamed, written, plain)] == [0o640] * 3
    assert _mode(folder) == 0o750
    for p in (streamed, written, plain, folder):
        os.chmod(p, 0o600 if p.is_file() else 0o700)
    with H5adResultWriter(src, streamed) as w:
        w.create_obsm("X_k", 2)
    write_h5ad_atomic(_adata(), written)
    atomic_write_bytes(plain, b"y")
    with atomic_dir(folder) as tmp:
        (tmp / "f").write_text("y")
    assert [_mode(p) for p in (streamed, written, plain)] == [0o600] * 3
    assert _mode(folder) == 0o700
    assert plain.read_bytes() == b"y"


def test_writing_through_a_symlink_replaces_the_file_it_points_to_and_keeps_its_mode(tmp_path):
    src = tmp_path / "in.h5ad"
    _adata().write_h5ad(src)
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    for name, write in [
        ("a.bin", lambda p: atomic_write_bytes(p, b"new")),
        ("b.h5ad", lambda p: write_output(_adata(4), p)),
        ("c.h5ad", lambda p: H5adResultWriter(src, p).close()),
    ]:
        real, link = real_dir / name, tmp_path / f"link-{name}"
        real.write_bytes(b"old")
        os.chmod(real, 0o604)
        link.symlink_to(real)
        write(link)
        assert os.readlink(link) == str(real)  # the link stays
        assert real.read_bytes() != b"old"  # the file it points to was replaced...
        assert _mode(real) == 0o604  # ...and kept its mode
    assert ad.read_h5ad(real_dir / "b.h5ad").n_obs == 4
    assert _hidden(tmp_path) == []
    assert _hidden(real_dir) == []


def test_a_dangling_symlink_is_refused_not_followed(tmp_path):
    link = tmp_path / "o.h5ad"
    link.symlink_to(tmp_path / "elsewhere" / "victim.h5ad")
    with pytest.raises(OutputError, match=r"symbolic link to .* which does not exist"):
        check_output(link, overwrite=False)
    with pytest.raises(OutputError, match="does not exist"):
        write_output(_adata(), link)
    assert link.is_symlink()
    assert not (tmp_path / "elsewhere").exists()


# -- 5. temporary names ----------------------------------------------------------------------------------------
def _temp_name_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.msfm-[0-9a-f]{{6}}-{os.getpid()}-[a-z0-9_]{{8}}\.tmp")


def test_temporary_names_are_marked_and_unpredictable(tmp_path):
    seen = []
    with atomic_path(tmp_path / "x.h5", suffix=".h5") as a, atomic_path(tmp_path / "x.h5") as b:
        seen += [a.name, b.name]
    with atomic_write(tmp_path / "x.h5") as fh:
        seen.append(Path(fh.name).name if isinstance(fh.name, str) else "")
    with atomic_dir(tmp_path / "x.h5.d") as d:
        assert _temp_name_re("x.h5.d").match(d.name)
    names = [n for n in seen if n]
    assert all(_temp_name_re("x.h5").match(n) for n in names[:2]), names
    assert len(set(names)) == len(names)


def test_planted_links_at_the_old_predictable_names_are_not_followed(tmp_path, ckpt, cells_h5ad):
    """Before: `.NAME.tmp-<pid>` (gene-embed), `.STEM.tmp.SUFFIX` (plots) and `NAME.tmp` (streamed h5ad writer)
    were opened by name, so a link planted there made msfm write wherever it pointed."""
    from msfm.data.writers import write_h5ad_streaming
    from msfm.pl import metric_bars

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    pid = os.getpid()
    planted = [
        out / f".genes.h5.tmp-{pid}",
        out / ".genes.h5.tmp",
        out / ".plot.tmp.png",
        out / "cells.h5ad.tmp",
        out / f".cells.h5ad.tmp-{pid}",
    ]
    for p in planted:
        p.symlink_to(victim)
    assert run("scfoundation", "embed-genes", cells_h5ad, "-c", ckpt, "-o", out / "genes.h5", "--genes", "CD3E",
               "--quiet", "--device", "cpu") == 0  # fmt: skip
    import matplotlib.pyplot as plt

    plt.close(metric_bars({"a": {"ari": 0.5}, "b": {"ari": 0.7}}, save=out / "plot.png"))
    frame = ad.read_h5ad(cells_h5ad)
    write_h5ad_streaming(out / "cells.h5ad", [frame.X], obs=frame.obs, var=frame.var)
    assert victim.read_text() == "precious"
    assert all(p.is_symlink() and os.readlink(p) == str(victim) for p in planted)
    with h5py.File(out / "genes.h5") as h5:
        assert h5["embeddings"].shape[1] == 1
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert ad.read_h5ad(out / "cells.h5ad").shape == frame.shape
    outputs = ["cells.h5ad", "genes.h5", "plot.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*outputs, *(p.name for p in planted)])


def test_open_hdf5_refuses_a_link_planted_in_place_of_its_temporary(tmp_path):
    victim = tmp_path / "victim.h5"
    victim.write_bytes(b"precious")
    with pytest.raises(OSError, match=r"symbolic link|Too many levels"):  # noqa: PT012
        with atomic_path(tmp_path / "o.h5") as tmp:
            tmp.unlink()
            tmp.symlink_to(victim)
            with open_hdf5(tmp):
                pass
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "o.h5").exists()
    assert _hidden(tmp_path) == []


# -- 6. temporaries of killed runs -----------------------------------------------------------------------------
def test_stale_temporaries_are_swept_when_the_next_write_starts(tmp_path):
    target = tmp_path / "o.h5ad"
    here = atomic._host_tag()
    other = "ffffff" if here != "ffffff" else "eeeeee"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".o.h5ad.msfm-{here}-{dead.pid}-abcdefgh.tmp",
            "dead_h5": f".o.h5ad.msfm-{here}-{dead.pid}-abcdefgi.tmp.h5ad",
            "live": f".o.h5ad.msfm-{here}-{live.pid}-abcdefgh.tmp",
            "old_foreign": f".o.h5ad.msfm-{other}-{dead.pid}-abcdefgh.tmp",
            "new_foreign": f".o.h5ad.msfm-{other}-{dead.pid}-abcdefgj.tmp",
            "other_target": f".p.h5ad.msfm-{here}-{dead.pid}-abcdefgh.tmp",
            "user_file": ".o.h5ad.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"x")
        two_days_ago = time.time() - 2 * 86400
        os.utime(tmp_path / names["old_foreign"], (two_days_ago, two_days_ago))
        write_output(_adata(), target)
        left = set(_hidden(tmp_path))
        assert left == {names[k] for k in ("live", "new_foreign", "other_target", "user_file")}
    finally:
        live.kill()
        live.wait()
    # Once the writer is gone, its temporary is swept too (here by the streaming writer).
    src = tmp_path / "in.h5ad"
    _adata().write_h5ad(src)
    H5adResultWriter(src, target).close()
    assert names["live"] not in _hidden(tmp_path)


def test_a_moved_aside_directory_is_kept_while_it_is_the_only_copy(tmp_path):
    """A kill between the two renames of atomic_dir leaves the previous folder under `.NAME.msfm-...old`."""
    here = atomic._host_tag()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".run.msfm-{here}-{dead.pid}-abcdefgh.old"
    old.mkdir()
    (old / "weights").write_text("only copy")
    assert sweep_stale(tmp_path / "run") == []
    assert (old / "weights").read_text() == "only copy"
    with atomic_dir(tmp_path / "run") as tmp:
        (tmp / "weights").write_text("new")
    assert sweep_stale(tmp_path / "run") == [old]  # the new folder is in place: the old copy may go


# -- 7. wording of the existing checks -------------------------------------------------------------------------
def test_existing_output_message_keeps_its_wording(tmp_path):
    (tmp_path / "o.h5ad").write_text("x")
    with pytest.raises(
        OutputError, match=r"Output .*o\.h5ad already exists\. Pass --overwrite \(overwrite=True\)"
    ):
        check_output_free(tmp_path / "o.h5ad", overwrite=False)
    with pytest.raises(OutputError, match="already exists"):
        check_output(tmp_path / "o.h5ad", overwrite=False)
