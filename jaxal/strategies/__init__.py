"""Query strategies: importing this package registers every strategy in `STRATEGIES`."""

from jaxal.strategies import baselines  # noqa: F401  (registers)
from jaxal.strategies import isal  # noqa: F401  (registers)
from jaxal.strategies import bald, badge, ll4al  # noqa: F401  (registers)
from jaxal.strategies import gradient  # noqa: F401  (registers)
from jaxal.strategies import gcn, qbc, sraal, vaal  # noqa: F401  (registers)
from jaxal.strategies.base import (  # noqa: F401
    STRATEGIES, Requirements, Scores, Selection, Strategy, StrategyContext, get_strategy, top_k)
