/*
 * WSI DeepZoom viewer page logic.
 *
 * Reads the DZI and API URLs from <body data-dzi-url data-api-url>, opens the DZI in
 * OpenSeadragon and fills the level legend from the slide's API JSON and its format policy
 * ({api}/policy: per DZI level, format, lossless, slide level read), highlighting the
 * DeepZoom level that matches the current zoom.
 *
 * Credentials (docs/deploy.md): a signed URL's query (grant, exp, sub, sig) in the page's own
 * URL is added to every URL the page requests (OpenSeadragon then copies the DZI's query onto
 * each tile URL); a bearer token handed over in the URL fragment (#access_token=..., which no
 * server sees) is kept in this tab's sessionStorage, removed from the address bar and sent as
 * Authorization: Bearer with every request: OpenSeadragon's ajaxHeaders with
 * loadTilesWithAjax, and fetch for the JSON and the associated images' previews.
 * <body data-base> is the path the server is served under (a proxy's sub-path).
 *
 * Exposed for tests and debugging:
 *   window.viewer     the OpenSeadragon viewer
 *   window.tileStats  {loaded, failed} counted from tile-loaded / tile-load-failed
 *   window.slideInfo  the API JSON once loaded (null before)
 *   window.scaleBar   {microns, pixels} of the scale bar last drawn (null without mpp)
 *   window.slidePolicy  the policy JSON once loaded (null before)
 */
(function () {
  'use strict';

  var body = document.body;
  var dziUrl = body.getAttribute('data-dzi-url') || '';
  var apiUrl = body.getAttribute('data-api-url') || '';
  var base = body.getAttribute('data-base') || '';

  // ---------------------------------------------------------------- credentials

  var TOKEN_KEY = 'tileserver.token';
  var SIGNED_PARAMS = ['grant', 'exp', 'sub', 'sig'];
  var token = null;
  var handed = /(?:^#|&)access_token=([^&]+)/.exec(window.location.hash);
  try {
    if (handed) {
      token = decodeURIComponent(handed[1]);
      window.sessionStorage.setItem(TOKEN_KEY, token);
      window.history.replaceState(null, '', window.location.pathname + window.location.search);
    } else {
      token = window.sessionStorage.getItem(TOKEN_KEY);
    }
  } catch (e) {
    token = handed ? decodeURIComponent(handed[1]) : null;
  }
  var pageQuery = new URLSearchParams(window.location.search);
  var signedQuery = SIGNED_PARAMS.every(function (k) { return pageQuery.has(k); })
    ? SIGNED_PARAMS.map(function (k) {
      return k + '=' + encodeURIComponent(pageQuery.get(k));
    }).join('&')
    : '';
  var authHeaders = token ? { Authorization: 'Bearer ' + token } : {};

  // The URL with the page's signed-URL query added (unchanged without one).
  function withCredentials(url) {
    if (!signedQuery || !url) {
      return url;
    }
    return url + (url.indexOf('?') < 0 ? '?' : '&') + signedQuery;
  }
  window.withCredentials = withCredentials;

  var legend = document.getElementById('legend');
  var legendBody = document.getElementById('legend-body');
  var toggle = document.getElementById('legend-toggle');
  var rowsEl = document.getElementById('level-rows');
  var metaEl = document.getElementById('slide-meta');
  var statusEl = document.getElementById('zoom-status');
  var indexLink = document.getElementById('index-link');

  var numberFormat = new Intl.NumberFormat('en-US');
  var FORMAT_LABELS = { jpeg: 'JPEG', jpg: 'JPEG', png: 'PNG', webp: 'WebP', avif: 'AVIF' };

  var tileStats = { loaded: 0, failed: 0 };
  window.tileStats = tileStats;
  window.slideInfo = null;
  window.slidePolicy = null;

  // Back link only in multi-slide mode (the server leaves {{INDEX_URL}} empty otherwise).
  if (indexLink && indexLink.getAttribute('href')) {
    indexLink.setAttribute('href', withCredentials(indexLink.getAttribute('href')));
    indexLink.hidden = false;
  }

  // Collapsible legend; starts collapsed where it would hide most of a small screen.
  function setLegendOpen(open) {
    toggle.setAttribute('aria-expanded', String(open));
    toggle.innerHTML = open ? '&minus;' : '+';
    legendBody.hidden = !open;
    legend.classList.toggle('collapsed', !open);
  }
  toggle.addEventListener('click', function () {
    setLegendOpen(toggle.getAttribute('aria-expanded') !== 'true');
  });
  if (window.matchMedia && window.matchMedia('(max-width: 640px), (max-height: 480px)').matches) {
    setLegendOpen(false);
  }

  var viewer = OpenSeadragon({
    id: 'viewer',
    prefixUrl: base + '/static/openseadragon/images/',
    tileSources: withCredentials(dziUrl),
    crossOriginPolicy: 'Anonymous',
    // A bearer token cannot ride on <img> requests: tiles are then fetched as XHRs.
    loadTilesWithAjax: Boolean(token),
    ajaxHeaders: authHeaders,
    // The 2D-canvas drawer behaves the same on every browser and GPU-less machine and
    // keeps the canvas readable (getImageData) for tests.
    drawer: 'canvas',
    showNavigator: true,
    navigatorPosition: 'BOTTOM_RIGHT',
    showRotationControl: false,
    maxZoomPixelRatio: 2,
    visibilityRatio: 0.5,
    timeout: 120000
  });
  window.viewer = viewer;

  viewer.addHandler('tile-loaded', function () {
    // Do not touch event.image / event.data: deprecated in OpenSeadragon 6, they log errors.
    tileStats.loaded += 1;
  });
  viewer.addHandler('tile-load-failed', function () {
    tileStats.failed += 1;
    scheduleUpdate();
  });
  viewer.addHandler('open-failed', function (event) {
    showViewerError('Could not open ' + dziUrl + (event && event.message ? ': ' + event.message : ''));
  });

  ['open', 'animation', 'animation-finish', 'resize', 'zoom'].forEach(function (name) {
    viewer.addHandler(name, scheduleUpdate);
  });

  // ---------------------------------------------------------------- scale bar

  /*
   * A scale bar from the slide's mpp (microns per level-0 pixel): the longest "round" length
   * (1, 2 or 5 x 10^n um) that fits in SCALE_MAX_PX CSS pixels at the current zoom. No
   * maintained OpenSeadragon scale-bar plugin is published on npm, hence these few lines.
   */
  var SCALE_MAX_PX = 160;
  var scaleBar = document.getElementById('scale-bar');
  var scaleLabel = scaleBar.querySelector('.scale-bar-label');
  window.scaleBar = null;

  function niceLength(maxMicrons) {
    var power = Math.pow(10, Math.floor(Math.log10(maxMicrons)));
    var steps = [5, 2, 1];
    for (var i = 0; i < steps.length; i++) {
      if (steps[i] * power <= maxMicrons) {
        return steps[i] * power;
      }
    }
    return power;
  }

  function lengthLabel(microns) {
    if (microns >= 1000) {
      return (microns / 1000) + ' mm';
    }
    return (microns >= 1 ? microns : microns.toPrecision(1)) + ' \u00b5m';
  }

  function updateScaleBar() {
    var info = window.slideInfo;
    var item = viewer.world.getItemAt(0);
    if (!info || !info.mpp || !info.mpp[0] || !item) {
      scaleBar.hidden = true;
      window.scaleBar = null;
      return;
    }
    // CSS pixels on screen per level-0 pixel of the slide.
    var zoom = item.viewportToImageZoom(viewer.viewport.getZoom(true));
    var micronsPerPx = info.mpp[0] / zoom;
    var microns = niceLength(SCALE_MAX_PX * micronsPerPx);
    var pixels = microns / micronsPerPx;
    scaleBar.style.width = pixels.toFixed(1) + 'px';
    scaleLabel.textContent = lengthLabel(microns);
    scaleBar.hidden = false;
    window.scaleBar = { microns: microns, pixels: pixels };
  }

  // ---------------------------------------------------------------- associated images

  function renderAssociated(info) {
    var items = info.associated || [];
    var section = document.getElementById('associated');
    var list = document.getElementById('associated-list');
    list.textContent = '';
    items.forEach(function (item) {
      var link = el('a');
      link.href = withCredentials(item.viewer_url);
      link.title = item.name + ' (' + fmt(item.width) + ' \u00d7 ' + fmt(item.height) + ' px)';
      link.setAttribute('data-associated', item.name);
      var img = el('img');
      setImage(img, withCredentials(item.preview_url));
      img.alt = item.name;
      img.loading = 'lazy';
      link.appendChild(img);
      link.appendChild(el('span', null, item.name));
      var li = el('li');
      li.appendChild(link);
      list.appendChild(li);
    });
    section.hidden = items.length === 0;
  }

  // An <img> from a URL: directly, or with a bearer token as a fetched blob.
  function setImage(img, url) {
    if (!token) {
      img.src = url;
      return;
    }
    fetch(url, { headers: authHeaders }).then(function (response) {
      if (!response.ok) {
        throw new Error('HTTP ' + response.status);
      }
      return response.blob();
    }).then(function (blob) {
      img.src = URL.createObjectURL(blob);
    }).catch(function () {
      img.alt += ' (unavailable)';
    });
  }

  // ---------------------------------------------------------------- legend

  var levels = [];       // API levels sorted by DZI level (0 = 1x1 px)
  var rowByLevel = {};   // DZI level -> <tr>
  var currentLevel = null;
  var updatePending = false;

  function scheduleUpdate() {
    if (updatePending) {
      return;
    }
    updatePending = true;
    window.requestAnimationFrame(function () {
      updatePending = false;
      updateCurrentLevel();
    });
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    return node;
  }

  function fmt(n) {
    return numberFormat.format(n);
  }

  function formatLabel(format) {
    var key = String(format || '').toLowerCase();
    return FORMAT_LABELS[key] || key.toUpperCase() || '?';
  }

  function encodingBadge(level) {
    var label = formatLabel(level.format);
    var badge;
    if (level.lossless) {
      badge = el('span', 'badge lossless', 'lossless ' + label);
      badge.title = 'Lossless: pixels identical to the slide';
    } else {
      var quality = level.quality !== null && level.quality !== undefined ? ' q' + level.quality : '';
      badge = el('span', 'badge lossy', label + quality);
      badge.title = 'Lossy ' + label + (quality ? ', quality ' + level.quality : '');
      if (level.original_tiles) {
        badge.textContent += ' \u00b7 original';
        badge.title += '; ' + level.original_tiles + ' of ' + level.tiles +
          ' tiles are the scanner\u2019s own JPEG bytes (X-Tile-Source: original)';
      }
    }
    return badge;
  }

  function addMeta(term, value) {
    if (value === null || value === undefined || value === '') {
      return;
    }
    metaEl.appendChild(el('dt', null, term));
    metaEl.appendChild(el('dd', null, value));
  }

  function renderLegend(info, policy) {
    levels = (policy.levels || []).slice().sort(function (a, b) { return a.level - b.level; });
    rowByLevel = {};
    currentLevel = null;

    metaEl.textContent = '';
    if (info.vendor) {
      addMeta('Vendor', info.vendor);
    }
    if (info.dimensions) {
      addMeta('Slide', fmt(info.dimensions[0]) + ' \u00d7 ' + fmt(info.dimensions[1]) + ' px');
    }
    if (info.mpp && info.mpp[0]) {
      addMeta('MPP', Number(info.mpp[0]).toFixed(3) + ' \u00d7 ' + Number(info.mpp[1]).toFixed(3) + ' \u00b5m');
    }
    if (info.tile_size) {
      addMeta('Tiles', info.tile_size + ' px, overlap ' + (info.overlap || 0) +
        (info.declared_format ? ', DZI ' + formatLabel(info.declared_format) : ''));
    }
    if (info.color) {
      var color = info.color;
      var icc = color.icc_profile ? 'ICC \u201c' + color.icc_profile.description + '\u201d'
        : 'no ICC profile';
      addMeta('Colour', color.mode + (color.transform !== 'none' ? ' \u2192 ' + color.transform : '') +
        ', ' + icc);
    }
    var lossless = levels.filter(function (l) { return l.lossless; }).length;
    addMeta('Levels', (policy.level_count !== undefined ? policy.level_count : levels.length) +
      (lossless ? ' (' + lossless + ' lossless' + (policy.enforce_lossless ? ', enforced' : '') + ')' : ''));

    rowsEl.textContent = '';
    // Full resolution first: the levels a reader zooms through are at the top.
    for (var i = levels.length - 1; i >= 0; i--) {
      var level = levels[i];
      var tr = el('tr', level.lossless ? 'level is-lossless' : 'level is-lossy');
      tr.setAttribute('data-level', String(level.level));
      tr.setAttribute('data-lossless', level.lossless ? 'true' : 'false');
      if (level.slide_level !== undefined && level.slide_level !== null) {
        tr.title = 'Read from OpenSlide level ' + level.slide_level +
          (level.slide_downsample ? ' (downsample ' + Number(level.slide_downsample).toFixed(2) + ')' : '');
      }
      tr.appendChild(el('th', 'num', level.level)).setAttribute('scope', 'row');
      tr.appendChild(el('td', 'dims', fmt(level.width) + ' \u00d7 ' + fmt(level.height)));
      var tiles = el('td', 'num', fmt(level.tiles));
      tiles.title = level.cols + ' \u00d7 ' + level.rows + ' tiles';
      tr.appendChild(tiles);
      var enc = el('td', 'enc');
      enc.appendChild(encodingBadge(level));
      tr.appendChild(enc);
      rowsEl.appendChild(tr);
      rowByLevel[level.level] = tr;
    }
    legend.setAttribute('data-state', 'ready');
    legend.setAttribute('aria-busy', 'false');
    scheduleUpdate();
  }

  function renderLegendError(message) {
    rowsEl.textContent = '';
    var tr = el('tr', 'placeholder error');
    var td = el('td', null, message);
    td.colSpan = 4;
    tr.appendChild(td);
    rowsEl.appendChild(tr);
    legend.setAttribute('data-state', 'error');
    legend.setAttribute('aria-busy', 'false');
  }

  /*
   * The DZI level OpenSeadragon needs at the current zoom: the smallest level whose width
   * is not below the rendered image width in device pixels, clamped to the pyramid.
   */
  function displayedLevel() {
    var item = viewer.world.getItemAt(0);
    if (!item || !levels.length) {
      return null;
    }
    var imageZoom = item.viewportToImageZoom(viewer.viewport.getZoom(true));
    var fullWidth = item.source.dimensions.x || levels[levels.length - 1].width;
    var rendered = imageZoom * fullWidth * (window.devicePixelRatio || 1);
    for (var i = 0; i < levels.length; i++) {
      if (levels[i].width >= rendered - 0.5) {
        return { level: levels[i], rendered: rendered, zoom: imageZoom };
      }
    }
    return { level: levels[levels.length - 1], rendered: rendered, zoom: imageZoom };
  }

  function updateCurrentLevel() {
    updateScaleBar();
    var shown = displayedLevel();
    if (!shown) {
      return;
    }
    var level = shown.level.level;
    if (level !== currentLevel) {
      if (currentLevel !== null && rowByLevel[currentLevel]) {
        rowByLevel[currentLevel].classList.remove('current');
        rowByLevel[currentLevel].removeAttribute('aria-current');
      }
      var row = rowByLevel[level];
      if (row) {
        row.classList.add('current');
        row.setAttribute('aria-current', 'true');
        if (row.scrollIntoView && !legendBody.hidden) {
          row.scrollIntoView({ block: 'nearest' });
        }
      }
      currentLevel = level;
      legend.setAttribute('data-current-level', String(level));
    }
    var pct = shown.zoom * 100;
    var text = 'Showing level ' + level + ' \u00b7 ' + fmt(Math.round(shown.rendered)) +
      ' device px wide \u00b7 ' + (pct >= 10 ? Math.round(pct) : pct.toFixed(pct >= 1 ? 1 : 2)) + '%';
    if (tileStats.failed) {
      text += ' \u00b7 ' + tileStats.failed + ' tile(s) failed';
    }
    statusEl.textContent = text;
  }

  function showViewerError(message) {
    var box = el('div', 'viewer-error', message);
    box.setAttribute('role', 'alert');
    document.getElementById('viewer').appendChild(box);
  }

  // ---------------------------------------------------------------- slide info

  if (!apiUrl) {
    renderLegendError('No slide info URL.');
  } else if (body.getAttribute('data-sign-in') === 'required' && !token && !signedQuery) {
    renderLegendError('Sign-in required: open this page with a signed URL or with ' +
      '#access_token=<token> (HTTP 401).');
    showViewerError('Sign-in required (HTTP 401).');
  } else {
    var getJson = function (url) {
      var headers = Object.assign({ Accept: 'application/json' }, authHeaders);
      return fetch(withCredentials(url), { headers: headers }).then(function (response) {
        if (!response.ok) {
          throw new Error('HTTP ' + response.status);
        }
        return response.json();
      });
    };
    // A slide page reads its policy from {api}/policy; an associated image's API JSON holds
    // its own per-level records.
    getJson(apiUrl)
      .then(function (info) {
        window.slideInfo = info;
        var policy = info.associated_images !== undefined ? getJson(apiUrl + '/policy')
          : Promise.resolve(info);
        return policy.then(function (pol) {
          window.slidePolicy = pol;
          renderLegend(info, pol);
          renderAssociated(info);
        });
      })
      .catch(function (err) {
        renderLegendError('Slide info unavailable (' + err.message + ').');
      });
  }
})();
