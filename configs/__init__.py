"""Python configs (get_config() -> ml_collections.ConfigDict) arrive with the training milestone."""
