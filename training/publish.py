"""Upload an export folder to the Hugging Face Hub (`publish.repo_id=ORG/NAME`)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from draftsmith.drafters.errors import DraftsmithError

REQUIRED_FILES = ("config.json", "model.safetensors", "README.md")


def publish(export_dir: str | Path, repo_id: str, *, private: bool = True, token: str | None = None) -> str:
    """Create (or reuse) the model repo and upload the export; returns the repo URL.

    The token comes from ``token``, else ``HF_TOKEN``, else the `hf auth login` cache (huggingface_hub's
    own lookup). The local export is only read, so any failure leaves it intact.
    """
    export_dir = Path(export_dir)
    missing = [name for name in REQUIRED_FILES if not (export_dir / name).is_file()]
    if missing:
        raise DraftsmithError(f"{export_dir} is not a complete export (missing {', '.join(missing)}): train first")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise DraftsmithError(f"publish.repo_id={repo_id!r}: give it as ORG/NAME")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(export_dir),
            commit_message="Upload draftsmith drafter",
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        hint = (
            "log in with `hf auth login` or set HF_TOKEN to a token with write access"
            if status in (401, 403)
            else "check publish.repo_id and your Hub access"
        )
        raise DraftsmithError(
            f"publishing to {repo_id} failed (HTTP {status}): {hint}; the export in {export_dir} is intact"
        ) from None
    except ValueError as err:  # upload_folder has the Hub validate README.md's front matter before committing
        raise DraftsmithError(
            f"publishing to {repo_id} failed: the Hub refused the metadata of {export_dir / 'README.md'} "
            f"({' '.join(str(err).split())}); fix its front matter or export again"
        ) from None
    except Exception as err:  # transport errors: requests, httpx or httpx2 depending on huggingface_hub's version
        raise DraftsmithError(
            f"publishing to {repo_id} failed: the Hub is unreachable ({type(err).__name__}: "
            f"{' '.join(str(err).split())}); the export in {export_dir} is intact, upload it later with "
            f"`hf upload {repo_id} {export_dir}`"
        ) from None
    return str(url)
