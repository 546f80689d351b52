"""``python -m ips_search.extract`` (``ips-search-extract``): embed every image of a dataset with a frozen encoder
into per-image HDF5 files that ``dataset: features`` reads. The extraction itself is :mod:`ips_search.extraction`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from ips_search.cli import OneLineParser, exit_code_of, interrupt_exits
from ips_search.errors import ConfigError

with interrupt_exits():  # torch loads here: seconds in which Ctrl-C must still be one line
    from ips_search.config import DataConfig
    from ips_search.data import DATASETS
    from ips_search.extraction import NAMED_ENCODERS, ExtractConfig, extract, extract_device, parse_extract
    from ips_search.space import load_space, resolve_data_paths


def _config_from_sections(data: dict[str, Any], model: dict[str, Any], args: argparse.Namespace) -> ExtractConfig:
    """A features data section's own ``extract``, or extraction settings around an image data section."""
    if DATASETS.get(data.get("dataset", DataConfig.dataset)).features:
        raw = dict(data.get("extract") or {})
        if not raw:
            raise ConfigError("the data section is already a features dataset with no extract settings; nothing to do")
    else:
        keep = {k: v for k, v in model.items() if k in ("encoder", "dim", "pretrained")}
        raw = {"from": data, "model": keep}
    for key in ("encoder", "dtype", "batch_size"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    return parse_extract(raw)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="ips-search-extract",
        description="Embed every image of a dataset with a frozen encoder into per-image HDF5 files "
        "(dataset: features reads them). Prints the output folder.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--space", help="search space whose data section to extract (name or YAML path)")
    which.add_argument("--data-yaml", help="YAML file with a data section (and optionally a model section)")
    p.add_argument("--encoder", help=f"{', '.join(NAMED_ENCODERS)} or a TorchScript file (default: warm-start)")
    p.add_argument("--dtype", choices=("float16", "float32"), help="stored dtype (default: float16)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="patches per encoder call (default: 256)")
    p.add_argument("--cache-dir", help="cache folder (default: $IPS_SEARCH_CACHE or ~/.cache/ips-search)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    return p


def _main(args: argparse.Namespace) -> int:
    device = extract_device(args.device)  # checked before any data is built
    if args.space:
        space = load_space(args.space)
        data, model = space.fixed.get("data", {}), space.fixed.get("model", {})
    else:
        path = Path(args.data_yaml)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {path} as YAML ({type(exc).__name__}); pass a YAML file") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            raise ConfigError(f"{path} needs a 'data' mapping (a data section like a search space's)")
        # relative paths as a space's (the cwd's): the folder's hash then names the data actually read
        data, model = resolve_data_paths(raw["data"]), raw.get("model") or {}
    cfg = _config_from_sections(dict(data), dict(model), args)
    print(extract(cfg, args.cache_dir, progress=True, device=device))
    return 0


def main(argv: list[str] | None = None) -> int:
    return exit_code_of(_main, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
