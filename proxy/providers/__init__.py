"""The provider registry: configuration ``type`` -> provider class.

Adding a provider type is one new module in this package plus one line here; routing,
handlers and the server never branch on a provider's type.
"""

from __future__ import annotations

from proxy.config.providers import ProviderConfig
from proxy.providers.base import Provider
from proxy.providers.ollama import OllamaProvider
from proxy.providers.openai_compat import OpenAICompatProvider

PROVIDER_TYPES: dict[str, type[Provider]] = {
    OpenAICompatProvider.type_name: OpenAICompatProvider,
    OllamaProvider.type_name: OllamaProvider,
}


def build_provider(config: ProviderConfig) -> Provider:
    return PROVIDER_TYPES[config.type](config)


__all__ = ["PROVIDER_TYPES", "Provider", "build_provider"]
