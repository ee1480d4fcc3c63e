//! `capsule serve --backend`: what the server serves from, the store directory (default) or
//! an S3 bucket. With a bucket the store directory keeps only the server's TLS identity and
//! token file, so any number of servers with copies of that directory serve one bucket.

use std::sync::Arc;

use anyhow::{Context, Result};
use capsule_images::Store;
use capsule_net::backend::Backend;

/// Where an S3-backed server's bucket is.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// Serve from an S3 bucket (Garage, AWS S3, MinIO, ...) instead of the store directory;
    /// credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
    #[arg(long, value_name = "s3://BUCKET[/PREFIX]")]
    pub backend: Option<String>,
    /// S3 API endpoint, e.g. http://127.0.0.1:3900 (default: AWS)
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 signing region (Garage: its s3_region)
    #[arg(long, env = "AWS_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Memory for blocks and objects an S3-backed server keeps (popular blocks are read from
    /// the bucket once per server)
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = crate::args::parse_size)]
    pub block_cache: u64,
}

impl BackendArgs {
    /// The backend and a description of it for the server's banner.
    pub fn open(&self, store: Store) -> Result<(Arc<dyn Backend>, String)> {
        if self.backend.is_none() {
            let what = store.root().display().to_string();
            return Ok((Arc::new(store), what));
        }
        let backend = self.open_s3()?;
        let what = backend.description().to_string();
        Ok((Arc::new(backend), what))
    }

    /// The bucket `--backend` names (which must be set).
    pub fn open_s3(&self) -> Result<capsule_store_s3::S3Backend> {
        let url = self.backend.as_deref().context("no --backend s3://BUCKET given")?;
        let mut config = capsule_store_s3::S3Config::parse_url(url)?;
        config.endpoint = self.s3_endpoint.clone();
        config.region = self.s3_region.clone();
        config.cache_bytes = self.block_cache;
        capsule_store_s3::S3Backend::open(&config).with_context(|| format!("opening {url}"))
    }
}
