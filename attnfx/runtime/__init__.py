"""What runs when a rewritten graph is called: the input-keyed cache, the custom ops, invariant caching,
guards on values passed in, denoising steps."""
