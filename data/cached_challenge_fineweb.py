"""Download the challenge's pre-tokenized FineWeb shards and tokenizer from the Hugging Face hub.

Usage:
    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10
    # the SP8192 export that the SP8192 records train on (not in the default repo):
    python data/cached_challenge_fineweb.py --variant sp8192 --repo-id kevclark/parameter-golf
    # a mirror, or a local stand-in tree (tests):
    HF_ENDPOINT=https://hf-mirror.example python data/cached_challenge_fineweb.py --variant sp1024
    python data/cached_challenge_fineweb.py --endpoint file:///tmp/hub --variant sp1024

Files land under --out (default: this data/ folder) with the export's layout, e.g.
data/datasets/fineweb10B_sp1024/fineweb_train_000000.bin and data/tokenizers/fineweb_1024_bpe.model;
train with DATA_PATH=data/datasets/fineweb10B_sp1024
TOKENIZER_PATH=data/tokenizers/fineweb_1024_bpe.model.

Resumable: a file already present is skipped when it verifies (shards: header and size; tokenizer:
loads). Each file is downloaded to NAME.part, verified (every shard through train_gpt.read_shard),
then renamed, so an interrupted run leaves no half file under a real name. Uses huggingface_hub
when it is importable and the endpoint is http(s); otherwise plain urllib against
{endpoint}/datasets/{repo}/resolve/{revision}/{path} (HF_TOKEN is sent if set, for gated repos).

Layout assumptions (the constants below), from the challenge's data/README.md and record READMEs,
not from a listing of the hub repo:
- the export sits under the folder `datasets/` of the dataset repo (REMOTE_ROOT);
- `datasets/manifest.json` lists {"datasets": [{"name", "tokenizer_name", "stats": {"files_train",
  "files_val"}}], "tokenizers": [{"name", "model_path", "vocab_path"}]}, paths relative to the root;
  when the manifest is missing we fall back to the templates and FALLBACK_VAL_SHARDS;
- shards are datasets/fineweb10B_<variant>/fineweb_{train,val}_%06d.bin, train numbered from 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# train_gpt.py owns the shard format; importing it keeps one definition of a valid shard.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))
from train_gpt import ConfigError, read_shard, shard_tokens  # noqa: E402

DEFAULT_REPO_ID = (
    "willdepueoai/parameter-golf"  # the challenge's dataset repo (sp1024, sp4096, ...)
)
SP8192_REPO_ID = (
    "kevclark/parameter-golf"  # the SP8192 export used by the SP8192 records (R0409 README)
)
DEFAULT_ENDPOINT = "https://huggingface.co"
REMOTE_ROOT = "datasets"
MANIFEST_PATH = "{root}/manifest.json"
SHARD_PATH = "{root}/datasets/fineweb10B_{variant}/fineweb_{split}_{index:06d}.bin"
TOKENIZER_PATHS = (
    "{root}/tokenizers/fineweb_{vocab}_bpe.model",
    "{root}/tokenizers/fineweb_{vocab}_bpe.vocab",
)
URL_TEMPLATE = "{endpoint}/datasets/{repo_id}/resolve/{revision}/{path}"
VARIANTS = {"sp1024": 1024, "sp4096": 4096, "sp8192": 8192}
DEFAULT_TRAIN_SHARDS = 80  # 8B tokens, the challenge downloader's default
FALLBACK_VAL_SHARDS = (
    1  # the val split (50,000 docs) fits one 10^8-token shard for every SP variant
)
CHUNK_BYTES = 1 << 20


class NotFound(Exception):
    """The hub answered, but has no such file."""


class Unreachable(Exception):
    """The hub could not be reached or refused access; the message says what to do."""


@dataclass(frozen=True)
class Source:
    repo_id: str
    endpoint: str
    revision: str
    root: str
    backend: str  # "hub" (huggingface_hub) or "urllib"

    def url(self, path: str) -> str:
        return URL_TEMPLATE.format(
            endpoint=self.endpoint.rstrip("/"),
            repo_id=self.repo_id,
            revision=self.revision,
            path=path,
        )


# ----------------------------------------------------------------------------
# Transfer backends: both write one remote file to `dest` or raise NotFound / Unreachable.
# ----------------------------------------------------------------------------
def fetch_urllib(source: Source, path: str, dest: Path) -> None:
    request = urllib.request.Request(source.url(path))
    if os.environ.get("HF_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, CHUNK_BYTES)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise NotFound(path) from err
        if err.code in (401, 403):
            raise Unreachable(
                f"{source.url(path)}: HTTP {err.code}. The dataset may be gated: accept "
                "its terms on the hub and set HF_TOKEN (or `huggingface-cli login`)."
            ) from err
        raise Unreachable(f"{source.url(path)}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, FileNotFoundError):  # file:// stand-in without that file
            raise NotFound(path) from err
        raise Unreachable(offline_message(source, err.reason)) from err
    except OSError as err:  # timeouts and resets mid-transfer
        raise Unreachable(offline_message(source, err)) from err


def fetch_hub(source: Source, path: str, dest: Path) -> None:
    """huggingface_hub keeps its own cache; we hard-link (or copy) the cached blob to `dest`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError

    try:
        cached = hf_hub_download(
            repo_id=source.repo_id,
            filename=path,
            repo_type="dataset",
            revision=source.revision,
            endpoint=source.endpoint,
        )
    except LocalEntryNotFoundError as err:  # the hub cannot be reached; a subclass of the next one
        raise Unreachable(offline_message(source, err)) from err
    except EntryNotFoundError as err:
        raise NotFound(path) from err
    except GatedRepoError as err:
        raise Unreachable(
            f"{source.repo_id} is gated: accept its terms on the hub, then "
            "`huggingface-cli login` or set HF_TOKEN."
        ) from err
    blob = Path(cached).resolve()
    try:
        os.link(blob, dest)
    except OSError:
        shutil.copyfile(blob, dest)


def offline_message(source: Source, reason: object) -> str:
    return (
        f"cannot reach {source.endpoint} ({reason}). Are you offline? Set --endpoint or "
        "HF_ENDPOINT to a mirror, or build local shards instead: "
        "python data/build_shards.py --from-stdlib --out data/stdlib_sp1024 --vocab-size 1024 "
        "--val-docs 300"
    )


def fetch(source: Source, path: str, dest: Path) -> None:
    (fetch_hub if source.backend == "hub" else fetch_urllib)(source, path, dest)


# ----------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------
def shard_header_ok(path: Path) -> bool:
    """Cheap resume check: train_gpt's header check (header words and file size; read_shard reads
    every token)."""
    try:
        shard_tokens(path)
    except (OSError, ConfigError):
        return False
    return True


def verify_file(path: Path, remote: str, full: bool) -> None:
    """Raise ValueError naming `remote` if the file at `path` is not what its name promises."""
    if remote.endswith(".bin"):
        if full:
            read_shard(path)  # raises ValueError naming the file
        elif not shard_header_ok(path):
            raise ValueError(f"{remote}: bad shard header or size")
    elif remote.endswith(".model"):
        import sentencepiece as spm

        try:
            spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{remote}: not a SentencePiece model ({err})") from err
    elif remote.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{remote}: not JSON ({err})") from err
    elif path.stat().st_size == 0:
        raise ValueError(f"{remote}: empty file")


def download(source: Source, remote: str, dest: Path) -> bool:
    """Fetch `remote` to `dest` unless a verified copy is there. Returns True if it downloaded."""
    if dest.exists():
        try:
            verify_file(dest, remote, full=False)
            print(f"skip file:{remote} verified", flush=True)
            return False
        except ValueError:
            print(f"refetch file:{remote} local_copy_invalid", flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        fetch(source, remote, part)
        verify_file(part, remote, full=True)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    print(
        f"download file:{remote} mib:{dest.stat().st_size / 2**20:.1f} "
        f"time_s:{time.perf_counter() - started:.1f}",
        flush=True,
    )
    return True


# ----------------------------------------------------------------------------
# What to fetch
# ----------------------------------------------------------------------------
def load_manifest(source: Source, out_dir: Path) -> dict | None:
    """The export's manifest (fetched fresh: it differs between repos), a local copy if the hub is
    unreachable, or None if the repo has none."""
    remote = MANIFEST_PATH.format(root=source.root)
    local = out_dir / local_relative(remote, source.root)
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(local.name + ".part")
    try:
        fetch(source, remote, part)
        verify_file(part, remote, full=True)
        os.replace(part, local)
    except NotFound:
        print(
            f"warning: {remote} not found on {source.repo_id}; using the built-in layout",
            file=sys.stderr,
        )
        return None
    except Unreachable:
        if not local.exists():
            raise
        print(f"warning: hub unreachable; using the local copy of {remote}", file=sys.stderr)
    finally:
        part.unlink(missing_ok=True)
    return json.loads(local.read_text(encoding="utf-8"))


def plan_files(
    manifest: dict | None, variant: str, train_shards: int, root: str, repo_id: str
) -> list[str]:
    """Remote paths to fetch: val shards, the first `train_shards` train shards, tokenizer files."""
    name, vocab = f"fineweb10B_{variant}", VARIANTS[variant]
    val_shards, max_train = FALLBACK_VAL_SHARDS, None
    tokenizer = [t.format(root=root, vocab=vocab) for t in TOKENIZER_PATHS]
    if manifest is not None:
        entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
        if entry is None:
            known = [d.get("name") for d in manifest.get("datasets", [])]
            hint = f"; sp8192 is on --repo-id {SP8192_REPO_ID}" if variant == "sp8192" else ""
            raise SystemExit(f"error: {repo_id} has no {name} (it has {known}){hint}")
        stats = entry.get("stats") or {}
        val_shards = int(stats.get("files_val", val_shards))
        max_train = int(stats["files_train"]) if "files_train" in stats else None
        tokenizers = manifest.get("tokenizers", [])
        tok = next((t for t in tokenizers if t.get("name") == entry.get("tokenizer_name")), None)
        if tok is not None:
            tokenizer = [f"{root}/{tok[k]}" for k in ("model_path", "vocab_path") if tok.get(k)]
    if max_train is not None and train_shards > max_train:
        raise SystemExit(
            f"error: {repo_id} has {max_train} train shards of {name}, asked for {train_shards}"
        )
    shards = [
        SHARD_PATH.format(root=root, variant=variant, split=split, index=i)
        for split, count in (("val", val_shards), ("train", train_shards))
        for i in range(count)
    ]
    return shards + tokenizer


def local_relative(remote: str, root: str) -> Path:
    """datasets/datasets/x/y.bin -> datasets/x/y.bin: the local tree mirrors the export's root."""
    return Path(remote).relative_to(root) if root else Path(remote)


def pick_backend(choice: str, endpoint: str) -> str:
    if choice != "auto":
        return choice
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return "urllib"
    return "hub" if endpoint.startswith(("http://", "https://")) else "urllib"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024")
    parser.add_argument(
        "--train-shards",
        type=int,
        default=DEFAULT_TRAIN_SHARDS,
        help="how many train shards (10^8 tokens each) to fetch, from the first",
    )
    parser.add_argument(
        "--repo-id",
        default=os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID),
        help=f"dataset repo (default {DEFAULT_REPO_ID}; SP8192 records: {SP8192_REPO_ID})",
    )
    parser.add_argument("--revision", default="main")
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT),
        help="hub URL (or a file:// stand-in tree); default $HF_ENDPOINT or the public hub",
    )
    parser.add_argument(
        "--remote-root", default=REMOTE_ROOT, help="folder of the export inside the repo"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="local root"
    )
    parser.add_argument("--backend", choices=("auto", "hub", "urllib"), default="auto")
    args = parser.parse_args(argv)
    if args.train_shards < 0:
        parser.error("--train-shards must be >= 0")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    """Download what --variant/--train-shards ask for; returns the local paths."""
    args = parse_args(argv)
    source = Source(
        args.repo_id,
        args.endpoint,
        args.revision,
        args.remote_root.strip("/"),
        pick_backend(args.backend, args.endpoint),
    )
    print(
        f"source repo:{source.repo_id} endpoint:{source.endpoint} backend:{source.backend} "
        f"variant:{args.variant} train_shards:{args.train_shards} out:{args.out}",
        flush=True,
    )
    try:
        manifest = load_manifest(source, args.out)
        remotes = plan_files(manifest, args.variant, args.train_shards, source.root, source.repo_id)
        paths = [args.out / local_relative(r, source.root) for r in remotes]
        fetched = sum(download(source, r, p) for r, p in zip(remotes, paths, strict=True))
    except Unreachable as err:
        raise SystemExit(f"error: {err}") from None
    except (NotFound, ValueError) as err:
        raise SystemExit(f"error: {source.repo_id}: {err}") from None
    print(
        f"done files:{len(paths)} downloaded:{fetched} data_path:{paths[0].parent} "
        f"tokenizer_path:{next(p for p in paths if p.suffix == '.model')}",
        flush=True,
    )
    return paths


if __name__ == "__main__":
    main()
