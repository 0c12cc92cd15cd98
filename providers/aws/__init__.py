"""AWS EC2: the adapter and its pure request builders. boto3 is imported only by the adapter."""

from providers.aws.adapter import AwsProvider
from providers.aws.build import AwsNetwork

__all__ = ["AwsNetwork", "AwsProvider"]
