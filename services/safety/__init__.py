"""The moderation stage: filters, the policy that combines them, the audit trail. See docs/interfaces.md."""
