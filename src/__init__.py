# The config resolvers (`${fast_precision:...}`) are registered on any import of the package, so every entry
# point, and every saved run config re-resolved later (evaluate, predict), finds them.
import src.config  # noqa: F401
