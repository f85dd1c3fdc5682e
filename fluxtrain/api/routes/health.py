from fastapi import APIRouter

from fluxtrain.api.deps import SettingsDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health(settings: SettingsDep) -> dict[str, str]:
    """Liveness probe; never needs the API key. `api_key` says whether the other endpoints do."""
    return {"status": "ok", "api_key": "none" if settings.api_key is None else "required"}
