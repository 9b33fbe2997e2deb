# The config resolvers are registered on any import of the package (omegaconf only: no torch).
import src.utils.resolvers  # noqa: F401
