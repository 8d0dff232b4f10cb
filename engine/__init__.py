"""TRACE's CPU development engine: SGLang's native /generate subset on transformers, with a radix prefix cache.

`engine.Engine` does the model work (synchronous, one thread); `app.init_app` serves it over HTTP;
`cli.main` is `trace-engine serve`. Not SGLang: for tests, the CPU demo and machines without a GPU.
"""
