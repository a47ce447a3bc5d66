"""The population store: where workers find, kill and publish individuals.

`open_store("gs://bucket/prefix")` opens a GCS store (the emulator named by the environment
variable STORAGE_EMULATOR_HOST, if set); any other address is a local or network-mounted
directory (`file://` prefix optional).
"""

from evojax_nas.store._retry import RetryingStore, retrying
from evojax_nas.store.base import Member, Store
from evojax_nas.store.local import LocalStore


def open_store(url: str, *, create: bool = True) -> Store:
    """Opens the store at `url`.

    Args:
        url: "gs://bucket/prefix" for GCS, otherwise a directory path or file:// URL.
        create: False to refuse (NotFoundError) a local directory that does not exist yet,
            for commands that only read or join a run.

    Returns:
        A GCSStore or a LocalStore.
    """
    if url.startswith("gs://"):
        from evojax_nas.store.gcs import GCSStore  # google-cloud-storage is slow to import.

        return GCSStore(url)
    return LocalStore(url.removeprefix("file://"), create=create)


def __getattr__(name: str):
    if name == "GCSStore":
        from evojax_nas.store.gcs import GCSStore

        return GCSStore
    raise AttributeError(name)


__all__ = ["GCSStore", "LocalStore", "Member", "RetryingStore", "Store", "open_store", "retrying"]
