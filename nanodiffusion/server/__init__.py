"""`nanodiffusion serve`: a web page and AUTOMATIC1111's HTTP API around the text-to-image pipeline.

Needs FastAPI and uvicorn (`pip install 'nanodiffusion[serve]'`); nothing else in the package imports this.
"""
