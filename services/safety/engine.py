"""The safety engine: runs the policy's filters for a stage, decides, and records the decision. Never imports
grpc.

One check, top to bottom:
1. take the current policy (a reload swaps it atomically; a check in flight keeps the one it started with);
2. run each filter the policy lists for the stage; a filter that fails is skipped if the policy says
`fail_open`,
   else it blocks in the category `filter_unavailable` (fail closed);
3. per item (the prompt, or each image): a category triggers when a score reaches its threshold; the item's
action
   is the strongest action of its triggered categories; the check's action the strongest over items;
4. append the decision to the audit log (durable) — only then is it returned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from services.safety.audit import AuditLog, now_iso
from services.safety.filters.base import CheckInput, Score
from services.safety.policy import ACTIONS, FAILURE_CATEGORY, Policy, PolicyError, load_policy

log = logging.getLogger(__name__)

# Filters a reload dropped are closed this long after it (checks in flight may still be using them).
_CLOSE_DELAY_SECONDS = 60.0
# "allow" is weaker than every policy action.
_RANK = {"allow": 0, **{a: i + 1 for i, a in enumerate(ACTIONS)}}


@dataclass(frozen=True)
class ItemVerdict:
    index: int  # which image (0 for a prompt)
    action: str  # "allow" | "flag" | "withhold" | "block"
    categories: list[str]  # the categories that triggered `action`, sorted


@dataclass(frozen=True)
class Decision:
    action: str  # the strongest action over the verdicts
    verdicts: list[ItemVerdict]
    policy_version: str
    decision_id: str  # also in the audit record


class SafetyEngine:
    def __init__(self, policy_path: str, audit: AuditLog | None, encoder_addr: str | None = None):
        self.policy_path = policy_path
        self.encoder_addr = encoder_addr  # the encoder service, unless the policy names one
        self.audit = audit
        self._policy: Policy | None = None
        self._reload_lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) of the loaded file
        self.last_reload_error: str | None = None

    @property
    def policy(self) -> Policy:
        if self._policy is None:
            raise RuntimeError("the policy is not loaded yet")
        return self._policy

    # --- policy ---------------------------------------------------------------------------------------------
    def load(self) -> None:
        """First load; raises PolicyError. Then warms every filter up."""
        stamp = _stamp(self.policy_path)
        policy = load_policy(self.policy_path, default_encoder_addr=self.encoder_addr)
        for instance in policy.filters.values():
            instance.warmup()
        self._policy, self._stamp = policy, stamp
        self._record_event("policy_loaded", version=policy.version, path=self.policy_path)

    def reload(self, force: bool = False) -> bool:
        """Loads the file again if it changed (or `force`); a bad file is rejected and the old policy kept.
        Returns True when a new policy took effect."""
        with self._reload_lock:
            stamp = _stamp(self.policy_path)
            if not force and stamp == self._stamp:
                return False
            old = self._policy
            try:
                policy = load_policy(self.policy_path, previous=old, default_encoder_addr=self.encoder_addr)
                for name, instance in policy.filters.items():
                    if old is None or old.filters.get(name) is not instance:
                        instance.warmup()
            # A bad new policy (or a filter that fails to load or warm up) never replaces a good one.
            except Exception as error:
                self._stamp = stamp  # do not retry the same bad file every poll
                message = str(error) if isinstance(error, PolicyError) else f"{type(error).__name__}: {error}"
                self.last_reload_error = message
                log.error("policy reload rejected, keeping version %s: %s", old and old.version, message)
                self._record_event("policy_rejected", error=message, kept_version=old and old.version)
                return False
            self._policy, self._stamp, self.last_reload_error = policy, stamp, None
            if old is not None:
                # Checks begun under the old policy may still use its filters: close them a little later.
                keep = {n for n, f in old.filters.items() if policy.filters.get(n) is f}
                timer = threading.Timer(_CLOSE_DELAY_SECONDS, old.close, kwargs={"keep": keep})
                timer.daemon = True
                timer.start()
            log.info("policy %s loaded from %s", policy.version, self.policy_path)
            self._record_event("policy_loaded", version=policy.version, path=self.policy_path)
            return True

    def watch(self, interval: float = 0.5) -> threading.Thread:
        """Polls the policy file and reloads it when it changes (a daemon thread)."""

        def loop() -> None:
            while True:
                time.sleep(interval)
                try:
                    self.reload()
                except Exception:  # the watcher must outlive any surprise
                    log.exception("policy watcher")

        thread = threading.Thread(target=loop, name="policy-watch", daemon=True)
        thread.start()
        return thread

    # --- checks ---------------------------------------------------------------------------------------------
    def check(self, item: CheckInput) -> Decision:
        started = time.monotonic()
        policy = self.policy
        n = item.count
        triggered: list[dict[str, str]] = [{} for _ in range(n)]  # per item: category -> action
        filter_records: list[dict[str, Any]] = []

        for name in policy.stages[item.stage]:
            instance = policy.filters[name]
            entry: dict[str, Any] = {"filter": name, "type": instance.type}
            try:
                per_item = instance.check(item)
                if len(per_item) != n:
                    raise RuntimeError(f"returned {len(per_item)} results for {n} items")
            except Exception as error:  # unreachable, timed out, a model failed: the policy's failure mode
                entry["error"] = f"{type(error).__name__}: {error}"
                entry["fail_open"] = policy.fail_open[name]
                log.warning(
                    "filter %s failed (%s): %s", name, "open" if entry["fail_open"] else "closed", error
                )
                if not policy.fail_open[name]:
                    for cats in triggered:
                        cats[FAILURE_CATEGORY] = "block"
                filter_records.append(entry)
                continue
            scores = []
            for index, item_scores in enumerate(per_item):
                for s in item_scores:
                    threshold = policy.threshold_for(name, s.category, s.threshold)
                    hit = s.score >= threshold
                    scores.append(_score_record(index, s, threshold, hit))
                    if hit:
                        action = policy.action_for(s.category, item.stage, fallback=s.action or "block")
                        current = triggered[index].get(s.category, "allow")
                        if _RANK[action] > _RANK[current]:
                            triggered[index][s.category] = action
            entry["scores"] = scores
            filter_records.append(entry)

        verdicts = []
        for index, cats in enumerate(triggered):
            action = max(cats.values(), key=_RANK.__getitem__, default="allow")
            verdicts.append(ItemVerdict(index, action, sorted(c for c, a in cats.items() if a == action)))
        overall = max((v.action for v in verdicts), key=_RANK.__getitem__, default="allow")
        decision = Decision(overall, verdicts, policy.version, uuid.uuid4().hex)

        record = {
            "event": "decision",
            "time": now_iso(),
            "decision_id": decision.decision_id,
            "request_id": item.context.get("request_id", ""),
            "user": item.context.get("user", ""),
            "identity": item.context.get("identity", ""),
            "tenant": item.context.get("tenant", ""),
            "stage": item.stage,
            "action": overall,
            "policy_version": policy.version,
            "items": n,
            "verdicts": [
                {"index": v.index, "action": v.action, "categories": v.categories} for v in verdicts
            ],
            "filters": filter_records,
            "latency_ms": round((time.monotonic() - started) * 1000, 2),
        }
        if item.prompt is not None:
            # The prompt itself stays out of the log (privacy); its hash lets an investigator match it.
            record["prompt_sha256"] = hashlib.sha256(item.prompt.encode("utf-8")).hexdigest()
        if self.audit is not None:
            self.audit.append(record)  # durable before the caller sees the decision
        return decision

    def _record_event(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.append({"event": event, "time": now_iso(), **fields})

    def close(self) -> None:
        if self._policy is not None:
            self._policy.close()


def _score_record(index: int, s: Score, threshold: float, hit: bool) -> dict[str, Any]:
    record = {
        "index": index,
        "category": s.category,
        "score": round(float(s.score), 6),
        "threshold": threshold,
    }
    record["hit"] = hit
    if s.detail:
        record["detail"] = s.detail
    return record


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
