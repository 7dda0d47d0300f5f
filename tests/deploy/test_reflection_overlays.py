"""Server reflection is off in the production (gpu) overlays and on in dev."""

from __future__ import annotations


def _settings(objects: list[dict]) -> dict:
    maps = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("unclip-settings")
    ]
    assert len(maps) == 1, [m["metadata"]["name"] for m in maps]
    return maps[0]["data"]


def test_reflection_is_off_in_production_and_on_in_dev(rendered):
    for overlay in ("gpu", "gpu-hpa", "gpu-cascade", "gpu-plain-secrets"):
        assert _settings(rendered[overlay]).get("UNCLIP_REFLECTION") == "false", overlay
    assert _settings(rendered["dev"]).get("UNCLIP_REFLECTION", "true") == "true"
