"""fluxserve: a self-hosted image generation service that speaks the ModelsLab API."""
__version__ = "0.1.0"
