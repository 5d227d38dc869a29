"""In-process simulators of the vendor appliances' REST APIs (aiohttp on loopback), for the vendor backend tests."""
