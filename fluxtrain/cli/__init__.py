"""The `fluxtrain` command."""
