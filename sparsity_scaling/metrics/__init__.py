"""Sparsity metrics on any `SparsityTarget` (target.py): the rules that decide which neurons
are active (rules.py), CETT thresholds (cett.py), forward passes (measure.py), searches
(search.py) and the result schema (result.py).

Here, free of torch so that settings can be checked anywhere: the values a metric's
settings may take.
"""

from ..errors import SettingError

SITES = ("intermediate", "gate", "up", "input")  # where a rule reads its scores (rules.py)


def check_site(site: str) -> None:
    if site not in SITES:
        raise SettingError("site", site, f"expected one of {', '.join(SITES)}")


def check_p(p: float) -> None:
    """PPL-p%: the allowed perplexity increase, in percent."""
    if not 0 < p <= 100:
        raise SettingError("p", p, "must be in (0, 100]")
