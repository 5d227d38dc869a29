"""The HTTP side: aiohttp apps, routes, parameters, answers, errors, tokens, transfers."""
