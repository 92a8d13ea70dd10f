"""One module per model family (see ``base.Family``). The registry (``fluxserve.models``) maps
each model name to its family and defaults; nothing else names a family."""
