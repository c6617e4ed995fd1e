"""--push-to-hub: the repository is created at start (a bad login fails before training) and
OUT's deliverables are uploaded at the end. Tokens are passed through, never written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from train.config import TrainConfig

logger = logging.getLogger(__name__)

# What the hub gets: the adapter, card, config, loss curve and validation grids; not the
# resumable checkpoints (large, optimizer state) nor the logs.
HUB_IGNORE = ["checkpoints/**", "logs/**", ".lock", ".tmp-*"]


def create_hub_repo(cfg: TrainConfig) -> str:
    """Create (or find) the --push-to-hub repository at start, private unless --hub-public, so a
    bad token or a name taken by someone else fails before training. Returns its id."""
    from huggingface_hub import create_repo

    name = cfg.hub_model_id or Path(cfg.output_dir).name
    return create_repo(name, exist_ok=True, private=not cfg.hub_public, token=cfg.hub_token).repo_id


def push_to_hub(cfg: TrainConfig, out: Path, repo_id: str) -> None:
    from huggingface_hub import upload_folder

    upload_folder(repo_id=repo_id, folder_path=out, commit_message="T2I-Adapter training run",
                  ignore_patterns=HUB_IGNORE, token=cfg.hub_token)
    logger.info("pushed %s to https://huggingface.co/%s", out, repo_id)


__all__ = ["HUB_IGNORE", "create_hub_repo", "push_to_hub"]
