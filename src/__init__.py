import src.utils.resolvers  # noqa: F401 - registers the config resolvers (omegaconf only: no torch)
