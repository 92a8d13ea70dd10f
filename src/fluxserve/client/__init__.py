"""Clients of a running fluxserve server over HTTP (``fluxserve generate``). Nothing here imports
torch, the engine or the server's own modules: only what any other client could do."""
