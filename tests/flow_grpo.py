"""Flow-GRPO's calling conventions, restated for tests (flow_grpo/rewards.py and scripts/train_sd3.py): how its
trainer builds, calls and combines reward functions. Restated from reading upstream, not copied."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def build_score_fns(score_functions: dict[str, Callable], score_dict: dict[str, float], device) -> dict:
    """``multi_score``'s construction: ``factory(device)`` when ``'device' in factory.__code__.co_varnames``, else
    ``factory()``, for each name of ``score_dict``."""
    return {
        name: score_functions[name](device)
        if "device" in score_functions[name].__code__.co_varnames
        else score_functions[name]()
        for name in score_dict
    }


def combine(score_fns: dict[str, Callable], score_dict: dict[str, float]) -> Callable:
    """``multi_score``'s inner ``_fn(images, prompts, metadata, only_strict=True) -> (details, {})``: each reward's
    scores under its name, their weighted sum under 'avg' (a list of floats)."""

    def _fn(images, prompts, metadata, only_strict: bool = True) -> tuple[dict[str, Any], dict]:
        details: dict[str, Any] = {}
        total: list = []
        for name, weight in score_dict.items():
            scores, _ = score_fns[name](images, prompts, metadata)
            details[name] = scores
            weighted = [weight * score for score in scores]
            total = weighted if not total else [t + w for t, w in zip(total, weighted, strict=True)]
        details["avg"] = total
        return details, {}

    return _fn


def multi_score(score_functions: dict[str, Callable], device, score_dict: dict[str, float]) -> Callable:
    """``flow_grpo.rewards.multi_score(device, score_dict)`` with its registry ``score_functions`` as an argument:
    the trainer calls it twice, for ``reward_fn`` and ``eval_reward_fn``."""
    return combine(build_score_fns(score_functions, score_dict, device), score_dict)


def per_prompt_advantages(prompts: list, rewards: np.ndarray) -> np.ndarray:
    """``PerPromptStatTracker.update`` (type 'grpo', global_std False) on a fresh tracker."""
    prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards)
    for prompt in np.unique(prompts):
        group = rewards[prompts == prompt]
        advantages[prompts == prompt] = (group - group.mean()) / (group.std() + 1e-4)
    return advantages
