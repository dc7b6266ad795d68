"""``tune download REPO_ID``: fetch a model snapshot from the Hugging Face Hub."""

from __future__ import annotations

import argparse

from attune.errors import AttuneError

DEFAULT_IGNORE = ["original/*"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download",
        help="download a model from the Hugging Face Hub",
        description="Download a model snapshot with huggingface_hub. Without --output-dir the "
        "files go to the Hugging Face cache; the folder is printed at the end. By default "
        "Meta's duplicate raw weights under original/ are skipped.",
    )
    parser.add_argument("repo_id", help="Hub repository, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--output-dir", help="folder to put the files in")
    parser.add_argument(
        "--ignore-patterns",
        nargs="*",
        default=None,
        help=f"glob patterns of files to skip (default: {' '.join(DEFAULT_IGNORE)}); "
        "give the option with no pattern to download everything",
    )
    parser.add_argument("--revision", help="branch, tag or commit (default: main)")
    parser.add_argument("--hf-token", help="access token for gated models (default: HF_TOKEN)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ignore = DEFAULT_IGNORE if args.ignore_patterns is None else args.ignore_patterns
    try:
        folder = snapshot_download(
            args.repo_id,
            local_dir=args.output_dir,
            ignore_patterns=ignore or None,
            revision=args.revision,
            token=args.hf_token,
        )
    except GatedRepoError:
        raise AttuneError(
            f"'{args.repo_id}' is gated: accept its licence on the Hub, then pass "
            "--hf-token or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise AttuneError(
            f"no Hub repository '{args.repo_id}' (or it is private: pass --hf-token)"
        ) from None
    except RevisionNotFoundError:
        raise AttuneError(f"'{args.repo_id}' has no revision '{args.revision}'") from None
    except LocalEntryNotFoundError:
        raise AttuneError(
            f"cannot download '{args.repo_id}': the Hugging Face Hub is not reachable from "
            "here (no network, or HF_HUB_OFFLINE is set) and no copy is cached; download it "
            "on a machine with access and copy the folder over"
        ) from None
    except OSError as error:
        raise AttuneError(f"cannot download '{args.repo_id}': {error}") from None
    except ValueError as error:  # huggingface_hub's check of the id's form
        reason = str(error).splitlines()[0]
        raise AttuneError(
            f"'{args.repo_id}' is not a valid Hub repository id (like org/name): {reason}"
        ) from None
    print(f"downloaded {args.repo_id} to {folder}")
    return 0
