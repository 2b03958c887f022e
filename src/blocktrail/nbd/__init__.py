"""The Network Block Device protocol: a sans-IO core (`proto`) and an asyncio server."""
