"""The WSGI entry point gunicorn serves: `webhook_gateway.wsgi:app`."""

from config.logging import setup_logging
from config.settings import load_settings
from webhook_gateway.app import create_app

_settings = load_settings()
setup_logging(_settings.LOG_LEVEL, _settings.LOG_FORMAT)
app = create_app(_settings)
