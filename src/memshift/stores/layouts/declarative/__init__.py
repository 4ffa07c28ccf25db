"""Declarative layouts: a team's own Redis keys, described in a TOML file.

``--layout acme.toml`` (any path ending in ``.toml``) reads the description, checks
it whole, and builds a :class:`DeclarativeLayout`. The format, with a worked example,
is in docs/layouts/custom.md.
"""

from memshift.stores.layouts.declarative.layout import DeclarativeLayout, load_layout
from memshift.stores.layouts.declarative.spec import LayoutSpec, load_spec

__all__ = ["DeclarativeLayout", "LayoutSpec", "load_layout", "load_spec"]
